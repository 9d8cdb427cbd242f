"""The preprocessing chain of ``transforms`` on a whole volume at once, without MONAI's
per-sample bookkeeping: what scoring runs, split in two. ``volume_boxes`` (in the decode workers,
on the CPU) resamples and finds every slice's crop box; ``finish_volume`` (on a GPU in the scoring
process; on a CPU run in the workers too) windows, crops, pads and resizes.

``preprocess_volume(volume, intensity, cfg, spacing)[k]`` equals
``preprocess_sample(context_planes(volume, k, c), intensity, cfg, None, spacing)`` as float16
(``tests/preprocess/test_volume_preprocess.py``). Only the resampling step uses MONAI (``Spacingd``,
imported when a config asks for it): importing MONAI takes seconds, and every decode worker
would pay them at start.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from scipy import ndimage

from lung_effnet.config import DataConfig
from lung_effnet.io.images2d import gray_divisor
from lung_effnet.io.planes import GRAY, HU
from lung_effnet.preprocess.area_resize import area_resize_half

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


LUNG_GRID_PX = 128
"""The lungs are found on every ``lung_step``-th row and column of a plane, about this many a
side (a 512 px slice: every 4th, 2.7 mm apart): a lung is 10 cm across and the box gets a margin
of 6% anyway, and finding them at full resolution cost 2 ms a plane, more than decoding it."""


def lung_step(height: int, width: int) -> int:
    """The grid step of ``plane_lung_box`` for an ``(height, width)`` plane: 1 up to 255 px."""
    return max(1, min(height, width) // LUNG_GRID_PX)


def plane_lung_box(plane: np.ndarray, threshold: float | None) -> tuple[int, int, int, int] | None:
    """The lungs' bounding box in one ``(H, W)`` float32 plane in [0, 1]: ``(top, bottom, left,
    right)`` (end-exclusive, ``LUNG_MARGIN`` added, clipped to the plane), or ``None`` when the plane
    shows no lungs (above the apices, below the bases, a blank or non-chest image).

    Found on the plane's ``lung_step`` grid (``grid_lung_box``); a windowed plane's grid is the grid
    of the windowed plane, so the decode workers window only the grid (``volume_boxes``).
    """
    step = lung_step(*plane.shape)
    return grid_lung_box(np.ascontiguousarray(plane[::step, ::step]), threshold, step, plane.shape)


def grid_lung_box(grid: np.ndarray, threshold: float | None, step: int,
                  shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """``plane_lung_box`` from the plane's ``step`` grid ``plane[::step, ::step]`` (``(h, w)``
    float32 in [0, 1]); ``shape`` is the plane's ``(H, W)``.

    Lungs are the dark connected regions (below ``threshold``, or the grid's Otsu threshold when it
    is ``None``) that do not touch the grid's edge (the air around the body does, through the
    padding outside the reconstruction circle) and cover at least ``LUNG_MIN_AREA`` of it. A grid
    row ``r`` stands for plane rows ``r * step`` to ``r * step + step - 1``.
    """
    dark = grid < (otsu_threshold(grid) if threshold is None else threshold)
    labels, n = ndimage.label(dark)
    if n == 0:
        return None
    area = np.bincount(labels.ravel(), minlength=n + 1)
    keep = area >= LUNG_MIN_AREA * grid.size
    keep[0] = False
    keep[np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))] = False
    if not keep.any():
        return None
    lungs = keep[labels]
    rows, cols = np.flatnonzero(lungs.any(1)), np.flatnonzero(lungs.any(0))
    top, bottom = int(rows[0]) * step, (int(rows[-1]) + 1) * step
    left, right = int(cols[0]) * step, (int(cols[-1]) + 1) * step
    margin = max(2, int(LUNG_MARGIN * max(bottom - top, right - left)))
    h, w = shape
    return max(top - margin, 0), min(bottom + margin, h), max(left - margin, 0), min(right + margin, w)


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


@dataclass
class DecodedVolume:
    """A decoded volume and where each of its samples is cropped: what ``finish_volume`` windows,
    crops and resizes; on a GPU run what a decode worker hands the scoring process
    (``scoring.prepare``), which does that on the device (a CPU run's workers do it themselves).

    ``planes``: ``(Z, H, W)`` in the source scale (HU, or grey levels), resampled to
    ``cfg.spacing_mm`` if set; int16 when the values are (DICOM usually: half the bytes to hand
    over), else float32. A torch tensor crosses to the scoring process in shared memory, not through
    a pipe, and holds a file descriptor there until it is freed; a unit of many 2D images hands over
    numpy arrays instead (pickled), so as not to hold one descriptor per image.
    ``boxes``: ``(Z, 4)`` int32 crop box ``(top, bottom, left, right)`` of sample k, end-exclusive,
    all -1 for no crop. ``scale``: grey images' divisor to the 8-bit scale (``gray_divisor``).
    """

    planes: torch.Tensor | np.ndarray
    boxes: np.ndarray
    intensity: str
    scale: float | None = None

    def __len__(self) -> int:
        return len(self.planes)


def volume_boxes(volume: np.ndarray, intensity: str, cfg: DataConfig,
                 spacing: tuple[float, float] | None = None) -> DecodedVolume:
    """The decode side of ``preprocess_volume``: resampling (when configured) and every sample's
    crop box, without windowing or resizing the planes themselves.

    Each plane's lungs are found on its grid (windowed: ``grid_lung_box``); a sample's box is the
    hull of its planes' lungs; where none shows lungs, or with ``crop: body``, the box is the
    body's, from each row's and column's brightest pixel (windowing is monotone, so a row holds a
    pixel above the body threshold exactly when its brightest one is: no full-plane windowing).

    Args:
        volume: ``(Z, H, W)`` HU or grey 0..255 (12- and 16-bit grey is scaled by ``scale``).
        spacing: ``(dy, dx)`` mm; resampled to ``cfg.spacing_mm`` when both are set (HU only).
    """
    scale = gray_divisor(float(np.max(volume, initial=0))) if intensity == GRAY else None
    planes = _resampled(volume, cfg.spacing_mm, spacing) if spacing and cfg.spacing_mm and intensity == HU else volume
    z, (h, w) = len(planes), planes.shape[1:]
    boxes = np.full((z, 4), -1, np.int32)
    if cfg.crop != "none" and z:
        low, high = window_bounds(cfg, intensity)
        body_t = body_threshold(cfg, intensity)
        step = lung_step(h, w)
        lungs = ([grid_lung_box(_window(planes[k, ::step, ::step], scale, low, high).numpy(), lung_threshold(cfg, intensity),
                                step, (h, w)) for k in range(z)] if cfg.crop == "lung" else [None] * z)
        body: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # plane -> its body rows (H,), columns (W,)

        def body_of(i: int) -> tuple[torch.Tensor, torch.Tensor]:  # only where a sample falls back to it
            if i not in body:
                body[i] = (_window(np.max(planes[i], axis=1), scale, low, high) > body_t,
                           _window(np.max(planes[i], axis=0), scale, low, high) > body_t)
            return body[i]

        for k in range(z):
            index = context_planes(np.arange(z), k, cfg.context_slices)
            box = hull(lungs[i] for i in index) if cfg.crop == "lung" else None
            if box is None:
                if cfg.crop == "lung":
                    warn_no_lungs()
                rows, cols = zip(*(body_of(int(i)) for i in index))
                box = _body_box(torch.stack(rows).any(0), torch.stack(cols).any(0))
            if box is not None:
                boxes[k] = box
    tensor = torch.from_numpy(np.ascontiguousarray(planes))
    return DecodedVolume(tensor if tensor.dtype in (torch.int16, torch.float32) else tensor.float(), boxes, intensity, scale)


def finish_volume(decoded: DecodedVolume, cfg: DataConfig, device: torch.device | str = "cpu",
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The per-pixel side of ``preprocess_volume``, on ``device``: for each run of samples with the
    same crop box, window the run's planes inside that box straight into a zero square (the pad),
    area-resize them once, and gather the run's samples (2.5D) from the result. On the CPU the
    values equal the per-sample MONAI chain's exactly; on a GPU they differ by float rounding (the
    area average's summation order).

    ``out``: where to write them, contiguous (a slice of a unit's images: no concatenation afterwards).

    Returns:
        ``(Z, 2 * cfg.context_slices + 1, S, S)`` float16 in [0, 1] on ``device`` (``out`` if given).
    """
    context, size, z = cfg.context_slices, cfg.image_size, len(decoded)
    shape = (z, 2 * context + 1, size, size)
    if out is None:
        out = torch.empty(shape, dtype=torch.float16, device=device)
    elif (tuple(out.shape) != shape or out.dtype != torch.float16 or not out.is_contiguous()
          or out.device.type != torch.device(device).type):  # "cuda" is out's "cuda:0"
        # the gather below writes through a view with ``out=``: a wrong shape would not raise there,
        # it would resize the view and write past this volume's rows
        raise ValueError(f"out must be a contiguous float16 tensor of shape {shape} on {device}, "
                         f"not {out.dtype} {tuple(out.shape)} on {out.device}")
    low, high = window_bounds(cfg, decoded.intensity)
    boxes = decoded.boxes
    for first in range(0, z, VOLUME_CHUNK):
        last = min(first + VOLUME_CHUNK, z)
        lo = max(first - context, 0)  # the chunk's slices and the neighbours they take as context
        # one host-to-device copy a chunk, of the region some sample of the chunk is cropped to,
        # as decoded (int16 for most DICOM: half the bytes of float32)
        region = _union(boxes[first:last], decoded.planes.shape[1:])
        block = torch.as_tensor(decoded.planes)[lo:min(last + context, z), region[0]:region[1], region[2]:region[3]]
        block = block.to(device, non_blocking=True)
        # Samples in a row that share a crop box (most, with boxes on the lung grid: the lungs
        # change little from one slice to the next) share planes too: each plane is windowed,
        # padded and resized once for the run, not once for each of up to three samples (2.5D).
        # Area resizing treats each plane on its own, so this gives the per-sample values exactly.
        for a, b in _runs(boxes, first, last):
            first_plane, last_plane = max(a - context, 0) - lo, min(b - 1 + context, z - 1) - lo + 1
            box = None if boxes[a, 0] < 0 else (int(boxes[a, 0]) - region[0], int(boxes[a, 1]) - region[0],
                                                int(boxes[a, 2]) - region[2], int(boxes[a, 3]) - region[2])
            # float16 before the gather: each plane is converted once, not once per sample using it
            resized = _window_pad_resize(block[first_plane:last_plane], box, decoded.scale, low, high, size)
            # context_planes for samples a..b-1, made on the device (no host round trip a run)
            offsets = torch.arange(-context, context + 1, device=device)
            index = (torch.arange(a, b, device=device)[:, None] + offsets).clamp_(0, z - 1) - (lo + first_plane)
            # straight into ``out``: 5x faster than ``out[a:b] = resized[index]``, which gathers into
            # a temporary and then copies it
            torch.index_select(resized, 0, index.view(-1), out=out[a:b].view(-1, size, size))
    return out


def preprocess_volume(volume: np.ndarray, intensity: str, cfg: DataConfig,
                      spacing: tuple[float, float] | None = None) -> np.ndarray:
    """Every slice of a volume through the chain at once, on the CPU: ``volume_boxes`` then
    ``finish_volume``.

    Gives for each k what ``preprocess_sample(context_planes(volume, k, c), intensity, cfg, None,
    spacing)`` gives, as float16 (tested equal), several times faster: the per-slice chain pays
    MONAI's MetaTensor bookkeeping on every slice, windows whole planes and finds each plane's
    lungs up to three times (2.5D). Here resampling and windowing run once per chunk of slices
    (they act on each plane alone, so a chunk gives the same numbers as one plane at a time), each
    plane's lungs are found once, and only crop, square pad and area resize run per slice, in
    plain torch with MONAI's arithmetic.

    Args:
        volume: ``(Z, H, W)``, HU or grey 0..255 (a grey "volume" is one image: ``Z = 1``; 12- and
            16-bit grey is scaled to 0..255 first, as ``preprocess_sample`` does).
        intensity: ``"HU"`` or ``"gray"``.
        spacing: ``(dy, dx)`` mm; resampled to ``cfg.spacing_mm`` when both are set (HU only).

    Returns:
        ``(Z, 2 * cfg.context_slices + 1, S, S)`` float16 in [0, 1], S = ``cfg.image_size``.
    """
    return finish_volume(volume_boxes(volume, intensity, cfg, spacing), cfg).numpy()


def _window(values, scale: float | None, low: float, high: float) -> torch.Tensor:
    """Grey levels or HU (array or tensor, any dtype) -> float32 tensor in [0, 1]: divided by
    ``scale`` (grey), then ScaleIntensityRange's arithmetic, ``(x - a_min) / (a_max - a_min)``
    (its "* 1 + 0" is exact), clipped: the same float32 values as the per-sample chain. In place
    on a float copy (a 512 px chunk of 32 planes is 32 MiB)."""
    x = torch.as_tensor(values)
    x = x.clone() if x.dtype == torch.float32 else x.float()  # never write the caller's data
    if scale is not None:
        x.div_(scale)
    return x.sub_(low).div_(high - low).clamp_(0.0, 1.0)


def _union(boxes: np.ndarray, shape) -> tuple[int, int, int, int]:
    """The region of an ``(H, W)`` plane that the ``(n, 4)`` boxes cover (the whole plane if any
    sample is not cropped)."""
    if len(boxes) == 0 or (boxes[:, 0] < 0).any():
        return 0, int(shape[0]), 0, int(shape[1])
    return int(boxes[:, 0].min()), int(boxes[:, 1].max()), int(boxes[:, 2].min()), int(boxes[:, 3].max())


def _resampled(volume: np.ndarray, spacing_mm: float, spacing: tuple[float, float]) -> np.ndarray:
    """``(Z, H, W)`` resampled in-plane to ``spacing_mm`` with MONAI's ``Spacingd`` (bilinear),
    each plane as a channel (the grid is the same for every plane), a chunk at a time: float32."""
    from monai.data import MetaTensor
    from monai.transforms import Spacingd

    affine = torch.as_tensor(np.diag([spacing[0], spacing[1], 1.0, 1.0]))
    resample = Spacingd(["image"], pixdim=(spacing_mm, spacing_mm), mode=("bilinear",))
    out: np.ndarray | None = None  # filled chunk by chunk: no list of chunks plus their concatenation
    for first in range(0, len(volume), VOLUME_CHUNK):
        x = torch.from_numpy(np.asarray(volume[first:first + VOLUME_CHUNK], dtype=np.float32))
        # Spacingd is typed as returning Tensors; it returns the MetaTensor it resampled
        chunk = cast(MetaTensor, resample({"image": MetaTensor(x, affine=affine)})["image"]).as_tensor().float().numpy()
        if out is None:
            out = np.empty((len(volume), *chunk.shape[1:]), np.float32)
        out[first:first + len(chunk)] = chunk
    return out if out is not None else np.asarray(volume, np.float32)


def _body_box(rows: torch.Tensor, cols: torch.Tensor) -> tuple[int, int, int, int] | None:
    """MONAI's CropForeground box from a sample's body rows ``(H,)`` and columns ``(W,)`` (a pixel
    is body when any channel is above the threshold): ``(top, bottom, left, right)``, the margin
    clipped to the image; ``None`` when there is no body (no crop)."""
    r, c = torch.nonzero(rows), torch.nonzero(cols)
    if not len(r):
        return None
    return (max(int(r[0]) - BODY_MARGIN, 0), min(int(r[-1]) + BODY_MARGIN + 1, len(rows)),
            max(int(c[0]) - BODY_MARGIN, 0), min(int(c[-1]) + BODY_MARGIN + 1, len(cols)))


def _runs(boxes: np.ndarray, first: int, last: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of consecutive samples in ``first..last`` with the same crop box."""
    runs, a = [], first
    for k in range(first + 1, last + 1):
        if k == last or not np.array_equal(boxes[k], boxes[a]):
            runs.append((a, k))
            a = k
    return runs


def _window_pad_resize(planes: torch.Tensor, box: tuple[int, int, int, int] | None, scale: float | None,
                       low: float, high: float, size: int) -> torch.Tensor:
    """``(n, H, W)`` planes as decoded (HU or grey levels, any dtype) -> ``(n, S, S)`` float16 in
    [0, 1]: crop to ``box`` (``None``: no crop), window (``_window``'s arithmetic), MONAI's
    symmetric SpatialPad to a square with zeros, area Resize (each plane on its own, as a channel;
    ``area_resize.area_resize_half``: torch's values, faster on the CPU), then float16.

    The window is written straight into the padded square: one float copy of the crop instead of
    a windowed copy and then a padded one (the pad is zeros either way, so the values are the same).
    The chain's clamp after the resize is left out: an average of values in [0, 1] stays in [0, 1]
    (float rounding is monotone), so it changes nothing.
    """
    x = planes if box is None else planes[:, box[0]:box[1], box[2]:box[3]]
    n, h, w = x.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    square = torch.zeros((n, side, side), dtype=torch.float32, device=x.device)
    inner = square[:, top:top + h, left:left + w]
    inner.copy_(x)
    if scale is not None:
        inner.div_(scale)
    inner.sub_(low).div_(high - low).clamp_(0.0, 1.0)
    return area_resize_half(square, size, nonnegative=True) if side != size else square.half()
