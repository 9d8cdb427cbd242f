"""NIfTI: reoriented to the canonical orientation, spacing kept, read back where it belongs."""

from __future__ import annotations

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest

from lung_effnet.io.nifti import read_nifti
from lung_effnet.io.volume import canonical_affine, write_nifti

SPACING = (2.5, 0.8, 0.7)  # dz, dy, dx in mm
ORIGIN_LPS = (-120.0, -100.0, 40.0)


def _volume_with_marker():
    hu = np.full((6, 10, 12), -1000.0, dtype=np.float32)
    hu[2, 3, 5] = 100.0  # slice 2, row 3 (posterior-ward), column 5 (patient-left-ward)
    return hu


def _marker_world_ras():
    dz, dy, dx = SPACING
    lps = np.array(ORIGIN_LPS) + np.array([5 * dx, 3 * dy, 2 * dz])
    return np.array([-lps[0], -lps[1], lps[2]])


@pytest.mark.parametrize("axcodes", [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "I"), ("A", "R", "S"), ("S", "L", "P")])
def test_any_stored_orientation_reads_back_canonical(tmp_path, axcodes):
    hu = _volume_with_marker()
    affine = canonical_affine(SPACING, ORIGIN_LPS)
    xyz = hu.transpose(2, 1, 0)
    # Store the same image in another voxel order, with the affine that keeps it in place.
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(axcodes))
    stored = nio.apply_orientation(xyz, transform)
    stored_affine = affine @ nio.inv_ornt_aff(transform, xyz.shape)
    assert nib.aff2axcodes(stored_affine) == axcodes
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(stored.astype(np.int16), stored_affine), str(path))

    volume = read_nifti(path)
    np.testing.assert_array_equal(volume.hu, hu)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.spacing == pytest.approx(SPACING)
    z, y, x = np.argwhere(volume.hu == 100.0)[0]
    np.testing.assert_allclose((volume.affine @ [x, y, z, 1])[:3], _marker_world_ras(), atol=1e-4)


def test_written_nifti_is_where_nibabel_and_monai_put_it(tmp_path):
    from monai.transforms import LoadImage

    hu = _volume_with_marker()
    path = write_nifti(tmp_path / "v.nii.gz", hu, canonical_affine(SPACING, ORIGIN_LPS))

    img = nib.load(str(path))
    x, y, z = np.argwhere(np.asarray(img.dataobj) == 100)[0]
    np.testing.assert_allclose(nib.affines.apply_affine(img.affine, [x, y, z]), _marker_world_ras(), atol=1e-4)

    loaded = LoadImage(image_only=True)(str(path))  # MetaTensor (X, Y, Z) with its RAS affine
    x, y, z = np.argwhere(loaded.numpy() == 100)[0]
    np.testing.assert_allclose((np.asarray(loaded.affine) @ [x, y, z, 1])[:3], _marker_world_ras(), atol=1e-4)


def test_not_3d_is_refused(tmp_path):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), str(path))
    with pytest.raises(ValueError, match="3D"):
        read_nifti(path)
