"""Preprocessing chain, slice selection and the content-keyed cache."""

from __future__ import annotations

import numpy as np
import pytest

from lung_effnet.config import DataConfig
from lung_effnet.ingest.sources import ingest
from lung_effnet.preprocess.cache import build_sample_set, select_rows
from lung_effnet.preprocess.transforms import preprocess_sample
from lung_effnet.synthetic.dataset import write_synthetic_dataset


def test_hu_are_windowed_and_grey_images_only_rescaled():
    cfg = DataConfig(image_size=16, crop="none")
    hu = np.array([[-1350.0, -600.0], [150.0, 1000.0]], np.float32)[None]
    image, _ = preprocess_sample(np.kron(hu, np.ones((8, 8), np.float32)), "HU", cfg)
    corners = image[0, ::8, ::8].numpy()
    np.testing.assert_allclose(corners, [[0.0, 0.5], [1.0, 1.0]], atol=1e-6)  # lung window -1350..150 HU
    grey = np.full((1, 16, 16), 128.0, np.float32)
    image, _ = preprocess_sample(grey, "gray", cfg)
    assert float(image.mean()) == pytest.approx(128 / 255, abs=1e-6)  # not windowed a second time


def test_crop_resize_keep_the_mask_on_the_lesion():
    cfg = DataConfig(image_size=32)
    hu = np.full((1, 100, 60), -1000.0, np.float32)
    hu[0, 10:90, 5:55] = 40.0          # body
    hu[0, 40:46, 20:26] = 300.0        # lesion
    mask = np.zeros((1, 100, 60), np.float32)
    mask[0, 40:46, 20:26] = 1
    image, mask_out = preprocess_sample(hu, "HU", cfg, mask=mask, spacing=(0.7, 0.7))
    assert tuple(image.shape) == (1, 32, 32) and tuple(mask_out.shape) == (1, 32, 32)
    assert mask_out.sum() > 0
    assert float(image[0][mask_out[0].bool()].mean()) == pytest.approx(1.0, abs=0.05)  # lesion pixels bright


def test_empty_slice_survives_the_body_crop():
    image, _ = preprocess_sample(np.full((1, 20, 20), -1000.0, np.float32), "HU", DataConfig(image_size=8))
    assert tuple(image.shape) == (1, 8, 8)


@pytest.fixture(scope="module")
def phantom_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    data = write_synthetic_dataset(root / "data", "nifti", n_patients=3, seed=3, size_px=48, n_slices=16, progress=False)
    return ingest(data, root / "ingest", labels_csv=data / "labels.csv", progress=False).rows


def test_lesion_selection_keeps_lesion_slices_and_all_normal_slices(phantom_rows):
    chosen = select_rows(phantom_rows, DataConfig(slices="lesion"))
    by_label = {label: [r for r in chosen if r["label"] == label] for label in ("benign", "malignant", "normal")}
    assert len(by_label["normal"]) == 16
    assert 3 <= len(by_label["malignant"]) < 16 and 3 <= len(by_label["benign"]) < 16
    assert len(select_rows(phantom_rows, DataConfig(slices="all"))) == 48


def test_cache_is_reused_and_keyed_by_settings(phantom_rows, tmp_path):
    cfg = DataConfig(image_size=24, slices="all")
    first = build_sample_set(phantom_rows, cfg, tmp_path, progress=False)
    again = build_sample_set(phantom_rows, cfg, tmp_path, progress=False)
    assert first.cache_hits == 0 and again.cache_hits == len(again) == 48
    assert (first.images == again.images).all()
    other = build_sample_set(phantom_rows, DataConfig(image_size=24, slices="all", window_width=1000.0), tmp_path, progress=False)
    assert other.cache_hits == 0  # another window: another key


def test_context_slices_give_three_channels(phantom_rows, tmp_path):
    samples = build_sample_set(phantom_rows, DataConfig(image_size=24, slices="all", context_slices=1), tmp_path, progress=False)
    assert tuple(samples.images.shape[1:]) == (3, 24, 24)
    middle = samples.images[:, 1]
    assert not (samples.images[:, 0] == middle).all()  # neighbours differ from the slice itself
