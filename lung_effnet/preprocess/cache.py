"""Manifest rows -> preprocessed tensors in memory, through an on-disk cache.

Preprocessing (``transforms``) is deterministic, so each sample is computed once and stored under a
key made of its pixels' content (a digest of the files it reads) and the preprocessing settings:
later folds, runs and experiments with the same settings load it instead of decoding again.
Cache entries are ``<cache_dir>/<key[:2]>/<key>.npz`` holding ``image`` ``(C, S, S)`` float16 in
[0, 1] and ``mask`` ``(1, S, S)`` uint8.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lung_effnet.classes import CLASSES
from lung_effnet.config import DataConfig
from lung_effnet.errors import InputError
from lung_effnet.io.images2d import is_image_2d, read_image_2d
from lung_effnet.io.masks import lesion, read_mask_image
from lung_effnet.io.nifti import is_nifti, read_nifti
from lung_effnet.io.planes import GRAY, HU, read_dicom_file
from lung_effnet.io.shared_files import temporary_beside
from lung_effnet.preprocess.transforms import preprocess_sample
from lung_effnet.preprocess.volume import context_planes

CACHE_VERSION = 3  # 2: 12-bit grey images scaled by 4095, not 65535 (io.images2d.gray_divisor); 3: lungs found on a grid (preprocess.volume.lung_step)
"""Bump when preprocessing changes meaning: old entries are then never read."""
PREPROCESS_KEYS = ("image_size", "window_center", "window_width", "spacing_mm", "context_slices", "crop")


def default_cache_dir() -> Path:
    """Where preprocessed tensors are cached when ``data.cache_dir`` is not set:
    ``$LUNG_EFFNET_CACHE_DIR``, else ``~/.cache/lung-effnet/preprocessed``."""
    return Path(os.environ.get("LUNG_EFFNET_CACHE_DIR", Path.home() / ".cache" / "lung-effnet" / "preprocessed"))


@dataclass
class SampleSet:
    """The samples a run trains and evaluates on, preprocessed.

    Attributes:
        images: ``(N, C, S, S)`` float16 in [0, 1].
        masks: ``(N, 1, S, S)`` uint8 lesion masks (all zero where none is known).
        mask_known: ``(N,)`` bool, rows with a lesion mask (``mask_path``); an empty known mask
            means "no lesion on this slice", an unknown one means nothing.
        labels: ``(N,)`` int64 indices into ``CLASSES``.
        patient_ids: ``(N,)`` patient pseudonyms; rows without a patient id get a unique ``row-<i>``.
        rows: the manifest rows, in the same order.
        digests: ``(N,)`` content digests of the preprocessed images (leakage audit).
        has_patient_ids: whether the source had patient ids at all.
        cache_hits: how many samples came from the cache rather than being preprocessed.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: np.ndarray
    patient_ids: np.ndarray
    rows: list[dict]
    digests: np.ndarray
    has_patient_ids: bool
    mask_known: np.ndarray | None = None
    cache_hits: int = 0

    def __len__(self) -> int:
        return len(self.rows)


@lru_cache(maxsize=8)
def _volume(path: str):
    return read_nifti(path)


@lru_cache(maxsize=64)
def _volume_peak(path: str) -> float:
    return float(_volume(path).hu.max(initial=0))


@lru_cache(maxsize=4096)
def file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Digest of a file's bytes (memoised by size and modification time)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_of(path: str) -> str:
    """``file_digest`` of the file at ``path`` as it is now (memoised by size and modification time)."""
    st = os.stat(path)
    return file_digest(path, st.st_size, st.st_mtime_ns)


def mask_plane(row: dict) -> np.ndarray | None:
    """The ``(H, W)`` lesion mask of a row, or ``None`` when it has none."""
    path = row.get("mask_path") or ""
    if not path:
        return None
    if is_image_2d(path):  # the rule ingest checked masks against (io.masks)
        return lesion(read_mask_image(path))
    return lesion(_volume(path).hu[int(row["slice_index"] or 0)], peak=_volume_peak(path))


def select_rows(rows: list[dict], cfg: DataConfig) -> list[dict]:
    """Which slices of the volumes to use: ``"all"``, or ``"lesion"``: the slices where the
    series' mask is non-zero, and every slice of a series whose mask is empty (a normal patient)
    or absent. 2D images are always used."""
    if cfg.slices == "all":
        return list(rows)
    # One look at each mask volume, not one per slice row (a mask is read once, scanned once).
    volume_masks = {r["mask_path"] for r in rows
                    if r.get("mask_path") and r.get("slice_index") not in (None, "") and not is_image_2d(r["mask_path"])}
    lesion_series = {path for path in volume_masks if lesion(_volume(path).hu).any()}
    keep = []
    for row in rows:
        if row.get("mask_path") in lesion_series:
            plane = mask_plane(row)
            assert plane is not None  # a row of a series in lesion_series has a mask_path
            if plane.any():
                keep.append(row)
        else:
            keep.append(row)
    return keep


class PlaneReader:
    """Reads the ``(C, H, W)`` planes of a row: the slice, and with ``context_slices=1`` its two
    neighbours in the series (the edge slice repeats at the ends). Knows every row of the manifest
    so that DICOM neighbours (other files) can be found by series and slice index."""

    def __init__(self, all_rows: list[dict], context: int):
        self.context = context
        self.by_position = {(r.get("series_uid", ""), str(r.get("slice_index", ""))): r["path"] for r in all_rows}

    def sources(self, row: dict) -> list[str]:
        """The files whose bytes this sample depends on (for the cache key)."""
        return [self._neighbour_path(row, d) for d in self._offsets()] if not is_nifti(row["path"]) else [row["path"]]

    def _offsets(self):
        return range(-self.context, self.context + 1)

    def _neighbour_path(self, row: dict, offset: int) -> str:
        if offset == 0 or row.get("slice_index") in (None, ""):
            return row["path"]
        k = int(row["slice_index"]) + offset
        return self.by_position.get((row.get("series_uid", ""), str(k)), row["path"])

    def read(self, row: dict) -> tuple[np.ndarray, str, tuple[float, float] | None]:
        """``(planes (C, H, W) float32, intensity, (dy, dx) mm or None)``."""
        path = row["path"]
        if is_image_2d(path):
            plane = read_image_2d(path)
            return np.repeat(plane[None], 2 * self.context + 1, axis=0), GRAY, None
        if is_nifti(path):
            volume = _volume(path)
            return context_planes(volume.hu, int(row["slice_index"]), self.context), HU, tuple(volume.spacing[1:])
        volumes = [read_dicom_file(self._neighbour_path(row, d)) for d in self._offsets()]
        _, dy, dx = volumes[0].spacing
        return np.stack([v.hu[0] for v in volumes]), HU, (dy, dx)


def cache_key(row: dict, reader: PlaneReader, cfg: DataConfig) -> str:
    settings = {k: getattr(cfg, k) for k in PREPROCESS_KEYS}
    parts = {
        "v": CACHE_VERSION,
        "settings": settings,
        "files": [digest_of(p) for p in reader.sources(row)],
        "slice": str(row.get("slice_index", "")),
        "mask": digest_of(row["mask_path"]) if row.get("mask_path") else "",
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()


def _store(path: Path, image: np.ndarray, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a run killed mid-write never leaves a truncated entry behind.
    fd, tmp = temporary_beside(path)
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, image=image, mask=mask)
    os.replace(tmp, path)


def load_or_preprocess(row: dict, reader: PlaneReader, cfg: DataConfig, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(image (C, S, S) float16, mask (1, S, S) uint8, was_cached)`` for one row."""
    entry = cache_dir / (key := cache_key(row, reader, cfg))[:2] / f"{key}.npz"
    if entry.exists():
        try:
            with np.load(entry) as data:
                return data["image"], data["mask"], True
        except (OSError, ValueError, KeyError):
            pass  # unreadable entry: recompute and overwrite it
    planes, intensity, spacing = reader.read(row)
    mask = mask_plane(row)
    image_t, mask_t = preprocess_sample(planes, intensity, cfg, None if mask is None else mask[None].astype(np.float32), spacing)
    image = image_t.numpy().astype(np.float16)
    mask_np = mask_t.numpy() if mask_t is not None else np.zeros((1,) + image.shape[1:], np.uint8)
    _store(entry, image, mask_np)
    return image, mask_np, False


def build_sample_set(rows: list[dict], cfg: DataConfig, cache_dir: str | Path, progress: bool = True) -> SampleSet:
    """Select the slices to use, then preprocess (or load from the cache) each one.

    Raises:
        ValueError: no rows left, or a label outside ``CLASSES``.
    """
    from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

    cache_dir = Path(cache_dir)
    selected = select_rows(rows, cfg)
    if not selected:
        raise InputError(f"no samples to train on after slice selection (data.slices={cfg.slices!r})")
    reader = PlaneReader(rows, cfg.context_slices)
    images, masks, hits = [], [], 0
    for row in tqdm(selected, desc="preprocess", unit="slice", disable=not progress, leave=False):
        image, mask, cached = load_or_preprocess(row, reader, cfg, cache_dir)
        images.append(image)
        masks.append(mask)
        hits += cached
    labels = np.array([CLASSES.index(r["label"]) for r in selected], dtype=np.int64)
    has_ids = any(r.get("patient_id") for r in selected)
    patient_ids = np.array([r.get("patient_id") or f"row-{i}" for i, r in enumerate(selected)])
    stacked = np.stack(images)
    digests = np.array([hashlib.blake2b(im.tobytes(), digest_size=12).hexdigest() for im in stacked])
    return SampleSet(
        images=torch.from_numpy(stacked), masks=torch.from_numpy(np.stack(masks)), labels=labels, patient_ids=patient_ids,
        rows=selected, digests=digests, has_patient_ids=has_ids, cache_hits=hits,
        mask_known=np.array([bool(r.get("mask_path")) for r in selected]),
    )
