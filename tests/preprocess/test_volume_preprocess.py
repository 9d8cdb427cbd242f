"""``preprocess_volume`` (scoring's whole-volume path) gives what training's per-sample MONAI chain
gives, value for value, and the decode workers' import of it stays free of MONAI."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from lung_effnet.config import DataConfig
from lung_effnet.preprocess.transforms import preprocess_sample
from lung_effnet.preprocess.volume import (
    VOLUME_CHUNK,
    context_planes,
    finish_volume,
    lung_step,
    preprocess_volume,
    volume_boxes,
)
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


@pytest.fixture(scope="module")
def clinical_volume():
    """Four slices at a clinical matrix (512 px, int16 as DICOM decodes): the lungs are found on
    every 4th row and column there (``lung_step``), as in real archives."""
    phantom = make_phantom("benign", np.random.default_rng(4), size_px=512, n_slices=4)
    return np.round(phantom.hu).astype(np.int16), tuple(float(s) for s in phantom.spacing[1:])


@pytest.mark.parametrize("image_size", [96, 224])
@pytest.mark.parametrize("crop", ["lung", "body"])
@pytest.mark.parametrize("spacing_mm", [None, 0.9])
def test_clinical_matrix_int16_equals_the_per_slice_chain(clinical_volume, image_size, crop, spacing_mm):
    hu, spacing = clinical_volume
    assert lung_step(*hu.shape[1:]) == 4
    cfg = DataConfig(image_size=image_size, context_slices=1, crop=crop, spacing_mm=spacing_mm)
    fast = preprocess_volume(hu, "HU", cfg, spacing)
    np.testing.assert_array_equal(fast, _per_slice(hu.astype(np.float32), "HU", cfg, spacing))


def test_the_scoring_device_path_equals_the_cpu_path(clinical_volume):
    """Decode side in a worker, pixel side wherever scoring runs: the split changes nothing on the
    CPU, and the planes cross as int16."""
    hu, spacing = clinical_volume
    cfg = DataConfig(image_size=96, context_slices=1, crop="lung")
    decoded = volume_boxes(hu, "HU", cfg, spacing)
    assert decoded.planes.dtype == torch.int16 and (decoded.boxes >= 0).all()
    np.testing.assert_array_equal(finish_volume(decoded, cfg, "cpu").numpy(), preprocess_volume(hu, "HU", cfg, spacing))
    assert np.array_equal(decoded.planes.numpy(), hu)  # windowing worked on copies


def test_finish_volume_writes_into_out_and_refuses_one_it_cannot_fill(clinical_volume):
    """``out``: a slice of a unit's images, written in place and nothing beside it; one of another
    shape, dtype or layout is an error, not rows written past its end (the gather writes with ``out=``)."""
    hu, spacing = clinical_volume
    cfg = DataConfig(image_size=96, context_slices=1, crop="lung")
    decoded = volume_boxes(hu, "HU", cfg, spacing)
    z = len(hu)
    images = torch.full((z + 2, 3, 96, 96), 7.0, dtype=torch.float16)
    assert finish_volume(decoded, cfg, "cpu", out=images[1:z + 1]).data_ptr() == images[1].data_ptr()
    np.testing.assert_array_equal(images[1:z + 1].numpy(), preprocess_volume(hu, "HU", cfg, spacing))
    assert (images[0] == 7).all() and (images[-1] == 7).all()
    for bad in (torch.empty((z, 1, 96, 96), dtype=torch.float16), torch.empty((z - 1, 3, 96, 96), dtype=torch.float16),
                torch.empty((z, 3, 96, 96)), torch.empty((z, 96, 96, 3), dtype=torch.float16).permute(0, 3, 1, 2)):
        with pytest.raises(ValueError, match="out must be"):
            finish_volume(decoded, cfg, "cpu", out=bad)


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
