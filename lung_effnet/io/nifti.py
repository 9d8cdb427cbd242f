"""NIfTI volumes through nibabel, reoriented to the package's canonical orientation."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from lung_effnet.errors import InputError
from lung_effnet.io.volume import Volume, check_finite, spacing_of, to_canonical

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | Path, series_uid: str = "") -> Volume:
    """Read a 3D NIfTI (HU for CT, or a label mask) as a canonical ``Volume``.

    The array is reoriented to axes (L, P, S) by permutation and flips only, so spacing and values
    are kept exactly; the affine is updated to match. A 4D file with one volume is squeezed; any
    other 4D file is refused.

    Raises:
        ValueError: not 3D, or an affine that does not place the voxels (singular);
            ``NonFiniteValuesError`` when a voxel is NaN or infinite (the volume is not used).
    """
    import nibabel as nib

    img = cast("SpatialImage", nib.load(str(path)))  # typed FileBasedImage; a NIfTI file loads as a SpatialImage
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"expected a 3D volume, found shape {data.shape}")
    affine = img.affine
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("singular affine: voxel positions are undefined")
    data = data.astype(np.float32)
    check_finite(data)
    zyx, affine, _ = to_canonical(data, affine)
    return Volume(hu=zyx, spacing=spacing_of(affine), affine=affine,
                  series_uid=series_uid or Path(path).name, source_files=[str(path)])
