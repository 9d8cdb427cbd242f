"""Find what can be scored under an input folder: DICOM series, NIfTI volumes, 2D images.

The walk is ingest's (``walk_files`` -> ``split_by_kind`` -> ``index_dicom_tree``): DICOM files
are grouped by SeriesInstanceUID by the header pass, localizers, SR, RT objects and other non-image
files are skipped there with their reason, unreadable headers failed. Only headers are read here;
pixels are decoded later, one unit at a time, in worker processes (``prepare``).

A *unit* is what one worker task decodes and what one resume record covers: a DICOM series, a
NIfTI volume, or a group of up to ``group_size`` 2D images (scored as one batch; each image is
still its own series row in the outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from lung_effnet.ingest.sources import split_by_kind
from lung_effnet.io.dicom_index import SeriesIndex, index_dicom_tree, record_walk_problems, relative_name, walk_files
from lung_effnet.io.ledger import Ledger

if TYPE_CHECKING:
    from nibabel.spatialimages import SpatialImage

DICOM, NIFTI, IMAGES = "dicom", "nifti", "images"


@dataclass
class ScoreUnit:
    """One decode task.

    Attributes:
        kind: ``"dicom"``, ``"nifti"`` or ``"images"``.
        key: stable identity across runs (the SeriesInstanceUID, or relative paths).
        files: relative paths of the input files this unit accounts for in the ledger.
        root: the input folder (absolute), to open ``files``.
        n_slices: slices expected (DICOM: indexed slices; NIfTI: from the header; images: one each).
        series: the DICOM header index (``None`` for other kinds).
    """

    kind: str
    key: str
    files: list[str]
    root: str
    n_slices: int
    series: SeriesIndex | None = field(default=None, repr=False)


@dataclass
class Discovery:
    """Units to score, and the ledger of the walk and the header pass (rows at ``walk`` and ``index``);
    ``n_files``: input files plus the folders and links the walk could not use, one ledger row each."""

    units: list[ScoreUnit]
    ledger: Ledger
    n_files: int


def discover(root: str | Path, exclude: str | Path | None = None, group_size: int = 64,
             progress: bool = True, map_fn: Callable | None = None) -> Discovery:
    """Walk ``root`` and return its units (see module docstring), in a deterministic order.

    ``exclude``: a folder left out of the walk (the output folder when it lies inside the input,
    so that a rerun does not read the previous run's outputs as inputs). ``map_fn``: an
    order-keeping parallel ``map`` for the header pass (``index_dicom_tree``); same result.
    """
    root = Path(root).resolve()
    files, problems = walk_files(root)
    if exclude is not None:
        skip = Path(exclude).resolve()
        files = [f for f in files if not f.resolve().is_relative_to(skip)]
        problems = [p for p in problems if not p.path.is_relative_to(skip)]
    ledger = Ledger()
    record_walk_problems(problems, root, ledger)  # unreadable folders, symlink loops...: rows, not gaps
    volumes, images, others = split_by_kind(files)
    series = index_dicom_tree(root, ledger, files=others, progress=progress, map_fn=map_fn)
    base = root if root.is_dir() else root.parent
    units = [ScoreUnit(DICOM, uid, [s.rel for s in entry.slices], str(base), len(entry.slices), entry)
             for uid, entry in series.items() if entry.slices]
    for path in volumes:
        rel = relative_name(path, root)
        units.append(ScoreUnit(NIFTI, rel, [rel], str(base), nifti_depth(path)))
    rels = [relative_name(p, root) for p in images]
    for start in range(0, len(rels), group_size):
        group = rels[start:start + group_size]
        units.append(ScoreUnit(IMAGES, f"{group[0]}..{group[-1]}", group, str(base), len(group)))
    return Discovery(units, ledger, len(files) + len(problems))


def nifti_depth(path: Path) -> int:
    """Slices along the superior axis, from the header alone (for the progress bar; 0 if unknown)."""
    try:
        import nibabel as nib
        import nibabel.orientations as nio

        img = cast("SpatialImage", nib.load(str(path)))  # typed FileBasedImage; a NIfTI file loads as a SpatialImage
        axes = nio.io_orientation(img.affine)[:, 0]
        return int(img.shape[list(axes).index(2)]) if len(img.shape) >= 3 else 0
    except Exception:  # an unreadable file fails later, in its worker, with its reason
        return 0
