"""The preprocessing chain of ``transforms`` on a whole volume at once, without MONAI's
per-sample bookkeeping: what scoring runs, in its decode workers.

``preprocess_volume(volume, intensity, cfg, spacing)[k]`` equals
``preprocess_sample(context_planes(volume, k, c), intensity, cfg, None, spacing)`` as float16
(``tests/preprocess/test_volume_preprocess.py``). Only the resampling step uses MONAI (``Spacingd``,
imported when a config asks for it): importing MONAI takes seconds, and every decode worker
would pay them at start.
"""

from __future__ import annotations

import warnings
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lung_effnet.config import DataConfig
from lung_effnet.io.images2d import gray_divisor
from lung_effnet.io.planes import GRAY, HU

BODY_HU = -500.0
"""Tissue denser than this is body (lungs are inside its outline); air and blankets are not."""
BODY_GRAY = 0.2
"""For already windowed images: the fraction of full scale above which a pixel is body."""
BODY_MARGIN = 2
"""Pixels kept around the body's bounding box."""
LUNG_HU = -400.0
"""Aerated lung (about -850 HU, -500 where dense) lies below this; soft tissue, vessels and nodules above."""
LUNG_MIN_AREA = 0.01
"""A dark region enclosed by the body counts as lung when it covers at least this fraction of the
plane: each lung covers 5-15% of an axial chest slice through the lungs, the trachea and main bronchi
(about 2 cm across, 0.3% of a 35 cm field) and bowel gas less."""
LUNG_MARGIN = 0.06
"""Kept around the lungs' bounding box, as a fraction of its longer side: the pleura and a
juxtapleural lesion's outer edge (a solid mass is not dark, so it can stick out of the dark region)."""
VOLUME_CHUNK = 32
"""Slices resampled and windowed together by ``preprocess_volume``: bounds its extra memory."""


def window_bounds(cfg: DataConfig, intensity: str) -> tuple[float, float]:
    """The ``(a_min, a_max)`` mapped to [0, 1]: the HU window, or 0..255 for grey images (they are
    windowed already: windowing twice would crush them)."""
    if intensity == GRAY:
        return 0.0, 255.0
    low = cfg.window_center - cfg.window_width / 2
    return low, low + cfg.window_width


def body_threshold(cfg: DataConfig, intensity: str) -> float:
    """The body threshold on the [0, 1] scale produced by the window (HU) or the rescale (grey)."""
    if intensity == GRAY:
        return BODY_GRAY
    low = cfg.window_center - cfg.window_width / 2
    return float(np.clip((BODY_HU - low) / cfg.window_width, 0.0, 1.0))


def lung_threshold(cfg: DataConfig, intensity: str) -> float | None:
    """The lung threshold on the [0, 1] scale of the window (HU); ``None`` for grey images, whose
    baked-in window is unknown: each plane then gets its own Otsu threshold (``otsu_threshold``)."""
    if intensity == GRAY:
        return None
    low = cfg.window_center - cfg.window_width / 2
    return float(np.clip((LUNG_HU - low) / cfg.window_width, 0.0, 1.0))


def otsu_threshold(plane: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of an ``(H, W)`` plane in [0, 1]: the grey level that best splits it into a
    dark class (air, lungs) and a bright one (soft tissue, bone), whatever window made the image."""
    counts, edges = np.histogram(plane, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_dark = np.cumsum(counts)
    weight_bright = weight_dark[-1] - weight_dark
    sum_dark = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_dark = sum_dark / weight_dark
        mean_bright = (sum_dark[-1] - sum_dark) / weight_bright
        between = weight_dark * weight_bright * (mean_dark - mean_bright) ** 2
    return float(edges[int(np.nanargmax(np.nan_to_num(between[:-1], nan=-1.0))) + 1])


def plane_lung_box(plane: np.ndarray, threshold: float | None) -> tuple[int, int, int, int] | None:
    """The lungs' bounding box in one ``(H, W)`` float32 plane in [0, 1]: ``(top, bottom, left,
    right)`` (end-exclusive, ``LUNG_MARGIN`` added, clipped to the plane), or ``None`` when the plane
    shows no lungs (above the apices, below the bases, a blank or non-chest image).

    Lungs are the dark connected regions (below ``threshold``, or the plane's Otsu threshold when it
    is ``None``) that do not touch the plane's edge (the air around the body does, through the
    padding outside the reconstruction circle) and cover at least ``LUNG_MIN_AREA`` of the plane.
    """
    dark = plane < (otsu_threshold(plane) if threshold is None else threshold)
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= LUNG_MIN_AREA * plane.size
    keep[0] = False
    keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    if not keep.any():
        return None
    lungs = keep[labels]
    rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
    margin = max(2, int(LUNG_MARGIN * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
    h, w = plane.shape
    return (max(int(rows[0]) - margin, 0), min(int(rows[-1]) + margin + 1, h),
            max(int(cols[0]) - margin, 0), min(int(cols[-1]) + margin + 1, w))


def hull(boxes) -> tuple[int, int, int, int] | None:
    """The smallest box holding every box that is not ``None`` (``None`` when none is): a 2.5D
    sample is cropped to the lungs of all its planes."""
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return None
    return (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))


def warn_no_lungs() -> None:
    """Shown once per process (Python's default warning filter): a slice without lungs is cropped
    to the body instead. Expected above the apices and below the bases; on every slice it means the
    images are not chest CT in a lung-compatible window (set ``data.crop: body``)."""
    warnings.warn("lung crop: no lung field found in a slice; cropped to the body instead", stacklevel=2)


def context_planes(hu: np.ndarray, k: int, context: int) -> np.ndarray:
    """The ``(2 * context + 1, H, W)`` planes of slice ``k`` of a ``(Z, H, W)`` volume: its
    neighbours ``k - context .. k + context``, the edge slice repeated beyond the ends (2.5D input;
    ``context=0`` is the slice alone). Shared by training and scoring so both see the same input."""
    idx = [min(max(k + d, 0), len(hu) - 1) for d in range(-context, context + 1)]
    return hu[idx]


def preprocess_volume(volume: np.ndarray, intensity: str, cfg: DataConfig,
                      spacing: tuple[float, float] | None = None) -> np.ndarray:
    """Every slice of a volume through the chain at once, as scoring needs it.

    Gives for each k what ``preprocess_sample(context_planes(volume, k, c), intensity, cfg, None,
    spacing)`` gives, as float16 (tested equal), 2-3x faster on 512 px slices (8.3 -> 3.5 ms a
    slice on one core, 96 px out): the per-slice chain pays MONAI's MetaTensor bookkeeping on
    every slice, most of it in steps that do not depend on the slice. Here resampling and
    windowing run once per chunk of slices (they act on each plane alone, so a chunk gives the
    same numbers as one plane at a time), and only the per-slice steps (lung or body crop,
    square pad, area resize) run per slice, in plain torch with MONAI's arithmetic; each plane's
    lungs are found once per chunk, though up to three samples use them.

    Args:
        volume: ``(Z, H, W)``, HU or grey 0..255 (a grey "volume" is one image: ``Z = 1``; 12- and
            16-bit grey is scaled to 0..255 first, as ``preprocess_sample`` does).
        intensity: ``"HU"`` or ``"gray"``.
        spacing: ``(dy, dx)`` mm; resampled to ``cfg.spacing_mm`` when both are set (HU only).

    Returns:
        ``(Z, 2 * cfg.context_slices + 1, S, S)`` float16 in [0, 1], S = ``cfg.image_size``.
    """
    # float32 a chunk at a time: a whole 600-slice 512 px volume would be 600 MiB more
    scale = gray_divisor(float(np.max(volume, initial=0))) if intensity == GRAY else None
    context, size, z = cfg.context_slices, cfg.image_size, len(volume)
    out = np.empty((z, 2 * context + 1, size, size), np.float16)
    threshold = body_threshold(cfg, intensity) if cfg.crop != "none" else None
    for first in range(0, z, VOLUME_CHUNK):
        last = min(first + VOLUME_CHUNK, z)
        low = max(first - context, 0)  # the chunk's slices and the neighbours they take as context
        planes = np.asarray(volume[low:min(last + context, z)], dtype=np.float32)
        block = _resample_and_window(planes if scale is None else planes / scale, intensity, cfg, spacing)
        if threshold is not None:  # body rows and columns of each plane, (n, H) and (n, W)
            body = block > threshold
            rows, cols = body.any(2), body.any(1)
        if cfg.crop == "lung":  # each plane's lungs once, though up to 3 samples use it
            lung_boxes = [plane_lung_box(plane, lung_threshold(cfg, intensity)) for plane in block.numpy()]
        for k in range(first, last):
            index = torch.from_numpy(context_planes(np.arange(len(block)), k - low, context))
            box = hull(lung_boxes[i] for i in index.tolist()) if cfg.crop == "lung" else None
            if box is None and threshold is not None:
                if cfg.crop == "lung":
                    warn_no_lungs()
                box = _body_box(rows[index].any(0), cols[index].any(0))
            out[k] = _crop_pad_resize(block, index, box, size).numpy()
    return out


def _resample_and_window(planes: np.ndarray, intensity: str, cfg: DataConfig, spacing) -> torch.Tensor:
    """``(n, H, W)`` -> ``(n, H', W')`` float32 tensor in [0, 1]: the chain's plane-wise steps,
    each plane taken as a channel (the resampling grid and the intensity map are the same for
    every channel)."""
    x = torch.from_numpy(planes)
    if spacing and cfg.spacing_mm and intensity == HU:
        affine = torch.as_tensor(np.diag([spacing[0], spacing[1], 1.0, 1.0]))
        from monai.data import MetaTensor
        from monai.transforms import Spacingd

        resample = Spacingd(["image"], pixdim=(cfg.spacing_mm, cfg.spacing_mm), mode=("bilinear",))
        # Spacingd is typed as returning Tensors; it returns the MetaTensor it resampled
        x = cast(MetaTensor, resample({"image": MetaTensor(x, affine=affine)})["image"]).as_tensor().float()
    low, high = window_bounds(cfg, intensity)
    # ScaleIntensityRange's arithmetic, (x - a_min) / (a_max - a_min) (its "* 1 + 0" is exact), so
    # the float32 values match; in place, as a copy of a 512 px chunk is 32 MiB
    return torch.sub(x, low).div_(high - low).clamp_(0.0, 1.0)


def _body_box(rows: torch.Tensor, cols: torch.Tensor) -> tuple[int, int, int, int] | None:
    """MONAI's CropForeground box from a sample's body rows ``(H,)`` and columns ``(W,)`` (a pixel
    is body when any channel is above the threshold): ``(top, bottom, left, right)``, the margin
    clipped to the image; ``None`` when there is no body (no crop)."""
    r, c = torch.nonzero(rows), torch.nonzero(cols)
    if not len(r):
        return None
    return (max(int(r[0]) - BODY_MARGIN, 0), min(int(r[-1]) + BODY_MARGIN + 1, len(rows)),
            max(int(c[0]) - BODY_MARGIN, 0), min(int(c[-1]) + BODY_MARGIN + 1, len(cols)))


def _crop_pad_resize(block: torch.Tensor, planes: torch.Tensor, box: tuple[int, int, int, int] | None,
                     size: int) -> torch.Tensor:
    """One sample, the ``(C,)`` ``planes`` of an ``(n, H, W)`` block in [0, 1] -> ``(C, S, S)``:
    crop to ``box`` (``None``: no crop), MONAI's symmetric SpatialPad to a square with zeros, area
    Resize. Cropping before gathering the planes copies only the box."""
    x = block if box is None else block[:, box[0]:box[1], box[2]:box[3]]
    x = x[planes]
    h, w = x.shape[1:]
    side = max(h, w)
    x = F.pad(x, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
    if side != size:
        x = F.interpolate(x[None], size=(size, size), mode="area")[0]
    return x.clamp_(0.0, 1.0)
