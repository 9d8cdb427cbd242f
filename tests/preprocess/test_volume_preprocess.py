"""``preprocess_volume`` (scoring's whole-volume path) gives what training's per-sample MONAI chain
gives, value for value, and the decode workers' import of it stays free of MONAI."""

import subprocess
import sys

import numpy as np
import pytest

from lung_effnet.config import DataConfig
from lung_effnet.preprocess.transforms import preprocess_sample
from lung_effnet.preprocess.volume import VOLUME_CHUNK, context_planes, preprocess_volume
from lung_effnet.synthetic.phantom import make_phantom


@pytest.fixture(scope="module")
def volume():
    """A phantom of more slices than one chunk, its first slice blank (air only: no body to crop to),
    its last one cut to a narrow strip of body (a crop far from square)."""
    phantom = make_phantom("malignant", np.random.default_rng(3), size_px=80, n_slices=VOLUME_CHUNK + 5)
    hu = phantom.hu.astype(np.float32)
    hu[0] = -1000.0
    hu[-1, :, :30] = -1000.0
    hu[-1, :, 50:] = -1000.0
    return hu, tuple(float(s) for s in phantom.spacing[1:])


def _per_slice(hu, unit, cfg, spacing):
    return np.stack([preprocess_sample(context_planes(hu, k, cfg.context_slices), unit, cfg, None, spacing)[0]
                     .numpy().astype(np.float16) for k in range(len(hu))])


@pytest.mark.parametrize("image_size", [48, 80, 112])
@pytest.mark.parametrize("context_slices", [0, 1])
@pytest.mark.parametrize("crop", ["lung", "body", "none"])
@pytest.mark.parametrize("spacing_mm", [None, 1.7])
def test_volume_path_equals_the_per_slice_chain(volume, image_size, context_slices, crop, spacing_mm):
    hu, spacing = volume
    cfg = DataConfig(image_size=image_size, context_slices=context_slices, crop=crop,
                     spacing_mm=spacing_mm, window_center=-550.0, window_width=1400.0)
    fast = preprocess_volume(hu, "HU", cfg, spacing)
    assert fast.shape == (len(hu), 2 * context_slices + 1, image_size, image_size) and fast.dtype == np.float16
    np.testing.assert_array_equal(fast, _per_slice(hu, "HU", cfg, spacing))


@pytest.mark.parametrize("scale", [1.0, 16.0, 257.0])  # 8-bit, 12-bit and 16-bit grey
def test_grey_images_equal_the_per_sample_chain(scale):
    grey = np.random.default_rng(0).integers(0, 256, (1, 70, 45)).astype(np.float32) * scale
    grey[0, :, :5] = 0.0  # a dark border, cropped away as background
    cfg = DataConfig(image_size=32, context_slices=1)
    fast = preprocess_volume(grey, "gray", cfg)
    np.testing.assert_array_equal(fast, _per_slice(grey, "gray", cfg, None))


def test_the_decode_workers_import_no_monai():
    """Importing MONAI takes seconds; every decode worker would pay them at start."""
    code = "import sys, lung_effnet.scoring.prepare; print(sorted(m for m in sys.modules if m.startswith('monai')))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.strip() == "[]"
