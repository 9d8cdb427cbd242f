"""Find the usable CT slices in a tree of DICOM files and group them into series.

The first of two passes: only headers are read here (no pixel data), so an archive is indexed
quickly and the pixels of one series at a time are decoded later by ``dicom_series``.

Rules (README.md, "Ingest your data", says the same for users):
- files are grouped by SeriesInstanceUID, never by folder;
- only axial CT images are kept; localizers, non-axial reformats, SR, RTSTRUCT, RTPLAN, SEG, other
  modalities and non-DICOM files are *skipped* with a reason; unreadable ones *fail* with a reason;
- no identifying value is kept: the PatientID is replaced by its keyed pseudonym at once.
"""

from __future__ import annotations

import errno
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from lung_effnet.io.ledger import Ledger
from lung_effnet.io.privacy import pseudonym

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL_MIN_COS = 0.8
"""A slice is axial when its normal is within ~37 degrees of the patient's z axis (gantry tilt
is at most ~30 degrees); sagittal and coronal reformats and most localizers are not."""

# Files that are never DICOM; skipping them by name saves opening thousands of sidecar files.
NON_DICOM_SUFFIXES = {
    ".txt", ".json", ".csv", ".md", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".gz",
    ".nii", ".zip", ".icc", ".py", ".yaml", ".yml", ".dump",
}


@dataclass
class SliceHeader:
    """What the index keeps of one CT slice file (no PHI: the patient is a pseudonym).

    ``position`` is the slice's coordinate along the series normal, in mm.
    """

    path: str
    rel: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    orientation: tuple[float, ...]
    origin: tuple[float, float, float]
    pixel_spacing: tuple[float, float]
    shape: tuple[int, int]
    position: float
    slope: float
    intercept: float
    thickness: float
    pixel: "PixelLayout | None" = None


@dataclass(frozen=True)
class PixelLayout:
    """Where and how a file stores its pixels, when they are stored natively (uncompressed).

    Found while reading the header (the file position where pydicom stopped is the Pixel Data
    element), so the decode pass can read the pixels without parsing the header a second time.
    """

    offset: int            # byte offset of the (7FE0,0010) element in the file
    header_bytes: int      # 8 (implicit VR) or 12 (explicit VR, OB/OW) before the value
    dtype: str             # numpy dtype of the stored values, with byte order


@dataclass
class SeriesIndex:
    """The slice headers of one series, plus the files of that series that could not be used."""

    series_uid: str
    slices: list[SliceHeader] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def patient_id(self) -> str:
        return self.slices[0].patient_id if self.slices else ""

    @property
    def study_uid(self) -> str:
        return self.slices[0].study_uid if self.slices else ""


@dataclass(frozen=True)
class WalkProblem:
    """A folder or file met by the walk that cannot enter the run (``walk_files``): ``status`` is
    ``failed`` or ``skipped``, as in the ledger."""

    path: Path
    is_dir: bool
    status: str
    reason: str


def walk_files(root: str | Path) -> tuple[list[Path], list[WalkProblem]]:
    """Every usable file under ``root`` (or ``root`` itself), sorted, hidden names excluded, and
    what the walk could not use: a folder it cannot list (permission denied), a symlinked folder
    (not followed), a symlink that loops or points nowhere, a path that is not valid UTF-8 (it
    could not be written to a UTF-8 CSV or manifest; rename it). Nothing disappears: the callers
    give every problem a ledger row (``record_walk_problems``)."""
    root = Path(root)
    if root.is_file():
        return [root], []
    found: list[Path] = []
    problems: list[WalkProblem] = []

    def unreadable(exc: OSError) -> None:
        reason = f"folder not readable: {exc.strerror or type(exc).__name__}"
        problems.append(WalkProblem(Path(exc.filename or root), True, "failed", reason))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            if os.path.islink(here / d):
                problems.append(WalkProblem(here / d, True, "skipped", "symlinked folder: not followed (give its target)"))
            else:
                kept.append(d)
        dirnames[:] = kept
        for f in sorted(f for f in filenames if not f.startswith(".")):
            problem = _unusable_file(here / f, root)
            if problem is None:
                found.append(here / f)
            else:
                problems.append(problem)
    return found, problems


def _unusable_file(path: Path, root: Path) -> WalkProblem | None:
    try:
        os.fspath(path.relative_to(root)).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        return WalkProblem(path, False, "failed", "file name is not valid UTF-8: rename it to use it")
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:
            what = ("symlink loop" if exc.errno == errno.ELOOP else
                    "broken symlink: its target does not exist" if exc.errno == errno.ENOENT else
                    f"symlink not followable: {exc.strerror}")
            return WalkProblem(path, False, "failed", what)
    return None


def list_files(root: str | Path) -> list[Path]:
    """The usable files of ``walk_files`` (what the walk could not use is left out)."""
    return walk_files(root)[0]


def record_walk_problems(problems: list[WalkProblem], root: Path, ledger: Ledger) -> None:
    """One ledger row (stage ``walk``) per problem of ``walk_files``; folders end with ``/``. The key is
    the path as found (undecodable bytes as surrogates), like every other ledger key: the ledger
    escapes it when written (``io.names.display_name``), so it cannot meet another file's key."""
    for problem in problems:
        name = relative_name(problem.path, root) + ("/" if problem.is_dir else "")
        getattr(ledger, problem.status)(name, "walk", problem.reason)


def relative_name(path: Path, root: Path) -> str:
    """Path as written in outputs: relative to the input root, POSIX separators."""
    root = root if root.is_dir() else root.parent
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": (8, "<"),     # implicit VR little endian
    "1.2.840.10008.1.2.1": (12, "<"),  # explicit VR little endian
    "1.2.840.10008.1.2.2": (12, ">"),  # explicit VR big endian (retired, still met)
}


def read_header(path: Path):
    """Read a DICOM header without pixel data; files without the DICM preamble are tried with
    ``force`` and accepted only if they hold a SOP class (so a text file is not 'DICOM').

    Returns ``(dataset, pixel_offset)``: the offset is where pydicom stopped, the start of the
    Pixel Data element when there is one.
    """
    with open(path, "rb") as fh:
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
        except InvalidDicomError:
            fh.seek(0)
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds:
                raise
        return ds, fh.tell()


def native_pixel_layout(ds, offset: int) -> PixelLayout | None:
    """The layout of natively stored single-sample pixels, or ``None`` (let pydicom decode)."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    bits = unsigned_short(ds, "BitsAllocated", 0)
    if syntax not in NATIVE_SYNTAXES or bits not in (8, 16, 32) or (unsigned_short(ds, "SamplesPerPixel", 1) or 1) != 1:
        return None
    if (unsigned_short(ds, "BitsStored", bits) or bits) != bits:
        return None  # pydicom's handling of the unused high bits applies; leave it to pydicom
    header_bytes, order = NATIVE_SYNTAXES[syntax]
    kind = "i" if unsigned_short(ds, "PixelRepresentation", 0) == 1 else "u"
    return PixelLayout(offset, header_bytes, f"{order}{kind}{bits // 8}")


def text_values(ds, keyword: str) -> list[str]:
    """The values of an ASCII-only element (UI, CS, DS, IS...) as stripped strings; [] if absent.

    Read from the raw bytes while pydicom has not converted the element yet: its conversion
    (DSfloat objects, validation hooks) costs ~50 us an element, a third of the whole header
    pass over an archive; these VRs are plain ASCII separated by backslashes by definition.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return []
    element = ds.get_item(tag)
    value = element.value
    if isinstance(value, (bytes, bytearray)):
        text = value.decode("ascii", "replace")
        return [v.strip(" \x00") for v in text.split("\\") if v.strip(" \x00")]
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value]
    return [str(value).strip()] if str(value).strip() else []


def unsigned_short(ds, keyword: str, default: int) -> int:
    """The value of a single-valued US element (Rows, BitsAllocated, ...), read from its raw bytes
    in the file's byte order while pydicom has not converted it (as ``text_values`` does for text:
    the conversion costs ~8 us an element, 7 of them a file); ``default`` if absent or empty."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return default
    element = ds.get_item(tag)
    value = element.value
    if isinstance(value, (bytes, bytearray)) and len(value) == 2 and hasattr(element, "is_little_endian"):
        return int.from_bytes(value, "little" if element.is_little_endian else "big")
    value = ds[tag].value  # converted already, or not a plain 2-byte value: pydicom decides
    return int(value) if value not in (None, b"", "") else default


def numbers(ds, keyword: str) -> list[float]:
    """Numeric values of a DS / IS element (see ``text_values``)."""
    return [float(v) for v in text_values(ds, keyword)]


def first_number(ds, keyword: str, default: float) -> float:
    values = numbers(ds, keyword)
    return values[0] if values else default


def classify_header(ds, path: Path, rel: str, pixel_offset: int = -1) -> tuple[SliceHeader | None, str, str]:
    """Decide whether a header is a usable axial CT slice.

    Returns ``(header, status, reason)``: a ``SliceHeader`` and ``"used"`` for a usable slice, else
    ``None`` with ``"skipped"`` (a valid object we do not want) or ``"failed"`` (a broken one).
    """
    sop_class = "".join(text_values(ds, "SOPClassUID"))
    modality = "".join(text_values(ds, "Modality"))
    if not sop_class:
        return None, "skipped", "no SOP Class UID: not a stored image (DICOMDIR or bare dataset)"
    kind = f"{modality or 'no modality'} ({UID(sop_class).name})"
    if modality != "CT" or sop_class != CT_IMAGE_STORAGE:
        if modality == "CT":
            return None, "skipped", f"{kind}: only single-frame CT Image Storage is read"
        return None, "skipped", f"{kind}: not a CT image"
    image_type = [v.upper() for v in text_values(ds, "ImageType")]
    if "LOCALIZER" in image_type:
        return None, "skipped", "localizer (ImageType LOCALIZER)"
    if first_number(ds, "NumberOfFrames", 1) > 1 or (unsigned_short(ds, "SamplesPerPixel", 1) or 1) != 1:
        return None, "skipped", "multi-frame or colour CT object: not a single grayscale slice"
    series_uid = "".join(text_values(ds, "SeriesInstanceUID"))
    if not series_uid:
        return None, "failed", "no SeriesInstanceUID"
    try:
        iop, ipp, spacing = numbers(ds, "ImageOrientationPatient"), numbers(ds, "ImagePositionPatient"), numbers(ds, "PixelSpacing")
        shape = (unsigned_short(ds, "Rows", -1), unsigned_short(ds, "Columns", -1))
        if min(shape) < 0:
            raise AttributeError("Rows or Columns missing")
    except (AttributeError, TypeError, ValueError):
        return None, "failed", "missing or invalid geometry (ImageOrientationPatient, ImagePositionPatient, PixelSpacing, Rows, Columns)"
    if len(iop) != 6 or len(ipp) != 3 or len(spacing) != 2:
        return None, "failed", "malformed geometry tags"
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-3:
        return None, "failed", "ImageOrientationPatient rows and columns are parallel"
    normal /= norm
    if abs(normal[2]) < AXIAL_MIN_COS:
        plane = "sagittal" if abs(normal[0]) >= abs(normal[1]) else "coronal"
        return None, "skipped", f"non-axial orientation ({plane})"
    header = SliceHeader(
        path=str(path),
        rel=rel,
        sop_uid="".join(text_values(ds, "SOPInstanceUID")),
        series_uid=series_uid,
        study_uid="".join(text_values(ds, "StudyInstanceUID")),
        patient_id=pseudonym(str(ds.get("PatientID", "") or "")),
        orientation=tuple(iop),
        origin=(ipp[0], ipp[1], ipp[2]),
        pixel_spacing=(spacing[0], spacing[1]),
        shape=shape,
        position=float(np.dot(ipp, normal)),
        slope=first_number(ds, "RescaleSlope", 1.0) or 1.0,
        intercept=first_number(ds, "RescaleIntercept", 0.0),
        thickness=first_number(ds, "SliceThickness", 0.0),
        pixel=native_pixel_layout(ds, pixel_offset) if pixel_offset >= 0 else None,
    )
    return header, "used", ""


def index_dicom_tree(root: str | Path, ledger: Ledger, files: list[Path] | None = None,
                     progress: bool = True, map_fn: Callable | None = None) -> dict[str, SeriesIndex]:
    """Read every file's header under ``root`` and group the usable CT slices by series.

    Every file gets a ledger row: usable slices ``used`` for now (decoding may still fail them),
    others ``skipped`` or ``failed`` with their reason (stage ``index``). ``files``: the files to
    read; ``None`` walks ``root`` (``walk_files``, what it cannot use gets rows at stage ``walk``).

    ``map_fn``: an order-keeping ``map`` (e.g. a process pool's, with a chunksize) to read the
    headers in parallel: at ~0.7 ms a file, the header pass of a large archive is otherwise as long
    as decoding it. ``None`` reads them here, one by one.

    Returns:
        series UID -> ``SeriesIndex``, in the order series were first met.
    """
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    root = Path(root)
    if files is None:
        files, problems = walk_files(root)
        record_walk_problems(problems, root, ledger)
    results = (map_fn or map)(partial(index_file, root=root), files)
    series: dict[str, SeriesIndex] = {}
    for rel, header, status, reason, uid in tqdm(results, total=len(files), desc="index DICOM", unit="file",
                                                 disable=not progress, leave=False):
        if header is None:
            getattr(ledger, status)(rel, "index", reason, uid)
            continue
        ledger.used(rel, header.series_uid)
        series.setdefault(header.series_uid, SeriesIndex(header.series_uid)).slices.append(header)
    for entry in series.values():
        order_series(entry, ledger)
    return series


def index_file(path: Path, root: Path) -> tuple[str, SliceHeader | None, str, str, str]:
    """One file's header: ``(rel, header, "used", "", uid)`` for a usable CT slice, else
    ``(rel, None, "skipped" | "failed", reason, uid or "")``. Never raises (picklable, for workers)."""
    rel = relative_name(path, root)
    if path.suffix.lower() in NON_DICOM_SUFFIXES:
        return rel, None, "skipped", f"not a DICOM file ({path.suffix} file)", ""
    try:
        ds, pixel_offset = read_header(path)
    except InvalidDicomError:
        return rel, None, "skipped", "not a DICOM file (no DICM preamble, no SOP class)", ""
    except Exception as exc:  # truncated header, bad VR, I/O error: one row, go on
        # The exception's text is left out on purpose: a parse error can quote an element's
        # value, and that element may be PatientName or another identifying tag.
        return rel, None, "failed", f"unreadable DICOM header ({type(exc).__name__})", ""
    header, status, reason = classify_header(ds, path, rel, pixel_offset)
    if header is None:
        return rel, None, status, reason, str(ds.get("SeriesInstanceUID", ""))
    return rel, header, "used", "", header.series_uid


def order_series(entry: SeriesIndex, ledger: Ledger) -> None:
    """Sort a series' slices by position along the slice normal (never InstanceNumber or file
    name), and drop files that cannot join it: another image size or orientation than the
    majority, a second copy of an instance already seen, or a second image at one position."""
    groups = defaultdict(list)
    for s in entry.slices:
        groups[(s.shape, tuple(np.round(s.orientation, 3)))].append(s)
    majority = {id(s) for s in max(groups.values(), key=len)}
    kept: list[SliceHeader] = []
    seen_sop: dict[str, str] = {}
    for s in entry.slices:
        if id(s) not in majority:
            ledger.failed(s.rel, "index", "image size or orientation differs from the rest of its series", s.series_uid)
            entry.dropped.append(s.rel)
        elif s.sop_uid and s.sop_uid in seen_sop:
            ledger.skipped(s.rel, "index", f"duplicate of {seen_sop[s.sop_uid]} (same SOPInstanceUID)", s.series_uid)
        else:
            seen_sop[s.sop_uid] = s.rel
            kept.append(s)
    kept.sort(key=lambda s: (s.position, s.rel))
    entry.slices = []
    for s in kept:
        if entry.slices and abs(s.position - entry.slices[-1].position) < 1e-3:
            ledger.skipped(s.rel, "index", f"another image of the series is at the same position ({entry.slices[-1].rel})", s.series_uid)
        else:
            entry.slices.append(s)
