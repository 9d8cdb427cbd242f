"""The lung-field crop: finds the lungs in HU and in already windowed grey images, keeps the lesion,
falls back to the body crop with a warning, and gives training, ``Predictor.preprocess`` and
scoring the same tensors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage

from lung_effnet.config import DataConfig, from_dict
from lung_effnet.models.predictor import Predictor
from lung_effnet.preprocess.transforms import preprocess_sample
from lung_effnet.preprocess.volume import lung_threshold, plane_lung_box, preprocess_volume
from lung_effnet.synthetic.dataset import window_to_uint8
from lung_effnet.synthetic.phantom import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom("malignant", np.random.default_rng(5), size_px=160, n_slices=6)


def _windowed(hu: np.ndarray, cfg: DataConfig) -> np.ndarray:
    low = cfg.window_center - cfg.window_width / 2
    return np.clip((hu - low) / cfg.window_width, 0, 1).astype(np.float32)


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def _area(box) -> int:
    return (box[1] - box[0]) * (box[3] - box[2])


def test_hu_box_holds_the_lungs_and_the_lesion_and_drops_the_rest_of_the_body(phantom):
    cfg = DataConfig()
    k = int(np.argmax(phantom.mask.sum((1, 2))))
    box = plane_lung_box(_windowed(phantom.hu[k], cfg), lung_threshold(cfg, "HU"))
    assert box is not None
    assert _inside(_box_of(phantom.lungs[k] > 0), box) and _inside(_box_of(phantom.mask[k] > 0), box)
    body = _box_of(phantom.hu[k] > -500)
    assert _area(box) < 0.8 * _area(body)  # the chest wall, table and air are gone


@pytest.mark.parametrize("air_grey", [None, 128])  # the file's own window; air baked mid-grey
def test_grey_images_find_the_same_lungs(phantom, air_grey):
    """A JPG holds a window nobody recorded: the lungs are found from its own grey levels (Otsu),
    also when the air around the body is mid-grey rather than dark."""
    cfg = DataConfig()
    k = int(np.argmax(phantom.mask.sum((1, 2))))
    grey = window_to_uint8(phantom.hu[k]).astype(np.float32)
    if air_grey is not None:
        labels, _ = ndimage.label(phantom.hu[k] < -400)
        outside = np.isin(labels, np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
        grey[outside & (labels > 0)] = air_grey
    from_grey = plane_lung_box(grey / 255.0, lung_threshold(cfg, "gray"))
    from_hu = plane_lung_box(_windowed(phantom.hu[k], cfg), lung_threshold(cfg, "HU"))
    assert from_grey is not None
    assert np.abs(np.subtract(from_grey, from_hu)).max() <= 3


def test_lung_crop_magnifies_the_lesion_over_the_body_crop(phantom):
    k = int(np.argmax(phantom.mask.sum((1, 2))))
    planes, mask = phantom.hu[k][None].astype(np.float32), phantom.mask[k][None].astype(np.float32)
    lesion_px = {crop: int(preprocess_sample(planes, "HU", DataConfig(image_size=64, crop=crop), mask=mask)[1].sum())
                 for crop in ("lung", "body")}
    assert lesion_px["lung"] > 1.2 * lesion_px["body"] > 0


def test_no_lungs_falls_back_to_the_body_crop_with_a_warning():
    hu = np.full((1, 60, 60), -1000.0, np.float32)
    hu[0, 10:50, 15:45] = 40.0  # a body without lungs (an abdomen slice)
    with pytest.warns(UserWarning, match="no lung field"):
        lung, _ = preprocess_sample(hu, "HU", DataConfig(image_size=24, crop="lung", context_slices=0))
    body, _ = preprocess_sample(hu, "HU", DataConfig(image_size=24, crop="body", context_slices=0))
    assert np.array_equal(lung.numpy(), body.numpy())
    with pytest.warns(UserWarning, match="no lung field"):
        fast = preprocess_volume(hu, "HU", DataConfig(image_size=24, crop="lung", context_slices=0))
    assert np.array_equal(fast[0], body.numpy().astype(np.float16))


def test_predictor_preprocess_equals_training_and_scoring(phantom):
    """``load_model(...).preprocess`` runs the chain training cached and scoring runs per volume:
    the same float32 tensor, the same float16 values as cached and scored."""
    cfg = from_dict({"data": {"image_size": 48, "crop": "lung", "context_slices": 0}})
    predictor = Predictor(__import__("torch").nn.Linear(1, 1), cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every slice of this slab shows lungs: no fallback
        via_predictor = predictor.preprocess(list(phantom.hu)).numpy()
        via_training = np.stack([preprocess_sample(p[None], "HU", cfg.data)[0].numpy() for p in phantom.hu])
        via_scoring = preprocess_volume(phantom.hu, "HU", cfg.data)
    assert np.array_equal(via_predictor, via_training)
    assert np.array_equal(via_training.astype(np.float16), via_scoring)


def test_configs_written_before_data_crop_still_load():
    assert from_dict({"data": {"crop_to_body": True}}).data.crop == "body"
    assert from_dict({"data": {"crop_to_body": False}}).data.crop == "none"
