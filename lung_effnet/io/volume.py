"""The one in-memory form of a CT volume that every reader returns and every writer takes.

Canonical orientation (the same for DICOM and NIfTI inputs, so that a model sees the same picture
whatever the file format): ``hu[z, y, x]`` with

- ``x`` (columns) increasing towards the patient's **left**,
- ``y`` (rows) increasing towards **posterior**,
- ``z`` (slices) increasing towards **superior**.

So ``hu[k]`` is an axial slice as a radiologist displays it (patient's right on the image's left,
anterior at the top), exactly what a standard axial DICOM slice's ``pixel_array`` looks like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lung_effnet.errors import InputError

# DICOM patient coordinates are LPS (+x left, +y posterior, +z superior); NIfTI / nibabel world
# coordinates are RAS. Multiplying by this flips the first two axes between them.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


NON_FINITE = "non-finite pixel values (NaN/inf)"
"""The reason given for an image, slice or volume with a NaN or infinite value: it is failed, never
scored or trained on (a NaN passes every threshold test as False, and the arg-max of NaN
probabilities is class 0, so it would come out as a silent ``benign``)."""


class NonFiniteValuesError(InputError):
    """Pixel or voxel values that are NaN or infinite (e.g. a DICOM RescaleSlope of "NaN")."""


def check_finite(values: np.ndarray) -> None:
    """Raise ``NonFiniteValuesError`` when a float array holds NaN or inf; integer arrays pass."""
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        raise NonFiniteValuesError(f"{NON_FINITE} in {bad} of {values.size} values")


@dataclass
class Volume:
    """A CT volume in Hounsfield units, in the canonical orientation above.

    Attributes:
        hu: ``(Z, Y, X)`` array in HU: int16 when every value is a whole number that fits (DICOM
            with slope 1 and an integer intercept, the usual CT rescale), else float32.
        spacing: ``(dz, dy, dx)`` voxel size in mm (dz is the distance between slice centres).
        affine: 4x4 RAS affine of the ``(X, Y, Z)``-ordered array (``hu.transpose(2, 1, 0)``), the
            convention of nibabel and MONAI: world_mm = affine @ (x, y, z, 1).
        series_uid: SeriesInstanceUID for DICOM; for other sources a stable id (the relative path).
        source_files: files that made each slice, in slice order (DICOM: one per slice; NIfTI: one).
        warnings: problems that did not stop the read (a gap in slice positions, dropped files).
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    series_uid: str = ""
    source_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return int(self.hu.shape[0])

    def to_nifti(self, path: str | Path, dtype=np.int16) -> Path:
        """Write the volume as NIfTI with its affine; nibabel and MONAI put every voxel where the
        DICOM geometry says. HU are stored rounded to ``int16`` by default (exact for CT)."""
        return write_nifti(path, self.hu, self.affine, dtype=dtype)


def affine_from_lps(origin_lps, row_dir, col_dir, slice_dir, spacing) -> np.ndarray:
    """RAS affine for an ``(X, Y, Z)``-ordered array from DICOM (LPS) geometry.

    Args:
        origin_lps: ImagePositionPatient of voxel (0, 0, 0), mm, LPS.
        row_dir: unit vector along a row (direction of increasing column index x), LPS.
        col_dir: unit vector along a column (direction of increasing row index y), LPS.
        slice_dir: unit vector of increasing slice index z, LPS.
        spacing: ``(dz, dy, dx)`` in mm.
    """
    dz, dy, dx = spacing
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir, float) * dx
    lps[:3, 1] = np.asarray(col_dir, float) * dy
    lps[:3, 2] = np.asarray(slice_dir, float) * dz
    lps[:3, 3] = np.asarray(origin_lps, float)
    return LPS_TO_RAS @ lps


def canonical_affine(spacing, origin_lps=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine of a volume already in the canonical orientation (axes L, P, S)."""
    return affine_from_lps(origin_lps, (1, 0, 0), (0, 1, 0), (0, 0, 1), spacing)


def write_nifti(path: str | Path, zyx: np.ndarray, affine: np.ndarray, dtype=np.int16) -> Path:
    """Write a ``(Z, Y, X)`` array with the RAS affine of its ``(X, Y, Z)`` transpose."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(zyx).transpose(2, 1, 0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = np.rint(data)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


CANONICAL_AXCODES = ("L", "P", "S")
"""nibabel axis codes of the canonical ``(X, Y, Z)`` array: x towards Left, y Posterior, z Superior."""


def to_canonical(xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient an ``(X, Y, Z)`` array with its RAS affine to the canonical orientation.

    Only axis permutations and flips are applied (no resampling), so voxel values and spacing are
    kept exactly; an oblique volume goes to the closest canonical orientation.

    Returns:
        ``(zyx, affine, transform)``: the ``(Z, Y, X)`` array, the RAS affine of its ``(X, Y, Z)``
        transpose, and nibabel's orientation transform (row i: input axis i goes to output axis
        ``transform[i, 0]``, reversed when ``transform[i, 1] == -1``).
    """
    import nibabel.orientations as nio

    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(CANONICAL_AXCODES))
    data = nio.apply_orientation(xyz, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, xyz.shape)
    return np.ascontiguousarray(data.transpose(2, 1, 0)), new_affine, transform


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """``(dz, dy, dx)`` voxel size in mm from the affine of an ``(X, Y, Z)`` array."""
    sx, sy, sz = np.linalg.norm(affine[:3, :3], axis=0)
    return float(sz), float(sy), float(sx)
