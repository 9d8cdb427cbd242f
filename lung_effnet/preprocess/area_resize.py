"""Area resize (MONAI ``Resize(mode="area")``, i.e. torch's ``adaptive_avg_pool2d``) to float16, exact and
1.5-1.8x as fast on the CPU at 224 px (0.50 -> 0.28-0.33 ms a 380-444 px plane; 1 thread).

Why: scoring resizes every slice of an archive, and torch's CPU kernel spends ~10 ns on each output pixel
working out its window (integer divisions), ~0.5 ms for a 224 x 224 plane whatever the input size: two
thirds of the scoring data path's per-pixel work (benchmarks/RESULTS.md). Training cached its inputs as
float16 from that kernel, so scoring must give the same float16 values, not merely close ones.

How: (1) a fast approximation, separable: each output row's window of input rows is averaged, then each
output column's window of those averages, both by torch's channels-last kernel with the other axis as
channels (one window computation per output row or column, shared by the whole row; the windows are
torch's, so the mean is the same up to float rounding); (2) exact rounding: the reference sums a window's
pixels in row-major order in float32 and divides by its height, then by its width. The two means differ by
at most a few units in the last place of float32 (bound below), so wherever the float16 value is the same
at both ends of that error interval it is the reference's float16 value; the pixels where it is not (under
1 in 100, those lying next to a float16 rounding boundary) are recomputed with the reference's arithmetic,
operation for operation. ``tests/preprocess/test_area_resize.py`` checks it bit for bit against
``F.interpolate`` and shows the approximation alone is not exact.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

UNIT_ROUNDOFF = 2.0 ** -24
"""float32's unit roundoff u: a rounded sum, product or quotient is off by at most this, relatively."""
FAST_MIN_OUTPUTS = 1 << 16
"""Output pixels of a call (planes x size x size) below which torch's kernel is the faster of the two:
the fast route's fixed cost (~0.1 ms a call) outweighs what it saves, e.g. 3 planes to 96 px (0.7x) or
128 px (0.9x); 3 planes to 160 px gain 1.2x, to 224 px 1.5x, 9 planes to 96 px 1.25x (1 thread)."""


def area_resize_half(planes: torch.Tensor, size: int, nonnegative: bool = False) -> torch.Tensor:
    """``(n, H, W)`` float32 -> ``(n, size, size)`` float16: ``F.interpolate(planes[None], (size, size),
    mode="area")[0].half()``, bit for bit.

    The fast route runs on the CPU for float32 values >= 0 (the error bound below needs terms of one
    sign) and calls of at least ``FAST_MIN_OUTPUTS`` output pixels; otherwise, and on a GPU (whose
    kernels round differently anyway, within 1e-3), that call itself. ``nonnegative``: the caller
    guarantees the values are >= 0 (windowed and clipped to [0, 1]), which saves the pass over the
    planes that checks it (~5% of the call).
    """
    if (planes.device.type != "cpu" or planes.dtype != torch.float32 or size == 1  # 1 x 1: torch takes the mean
            or len(planes) * size * size < FAST_MIN_OUTPUTS or (not nonnegative and bool(planes.min() < 0))):
        return F.interpolate(planes[None], size=(size, size), mode="area")[0].half()
    return _fast_area_resize_half(planes.contiguous(), size)


def _fast_area_resize_half(planes: torch.Tensor, size: int) -> torch.Tensor:
    """The fast route of `area_resize_half` (module docstring): ``(n, H, W)`` contiguous float32 >= 0 on
    the CPU, ``size`` > 1."""
    n, h, w = planes.shape
    approx = _separable_means(planes, size)
    row_starts, row_lengths = adaptive_windows(h, size)
    col_starts, col_lengths = adaptive_windows(w, size)
    kh, kw = int(row_lengths.max()), int(col_lengths.max())
    # Error bound (all terms >= 0, so relative bounds hold in any summation order): the reference's sum
    # of k = kh * kw terms and its two divisions are off by at most (k + 1) u relatively, the
    # approximation's two averages (a sum and a division each) by (kh + kw) u, u more for rounding the
    # products below: m u to first order; the second-order terms are under (m u)^2, i.e. ceil(m^2 u) u
    # (one u up to 64 x 64 windows). Rounded up to an even multiple of u so that 1 - eps and 1 + eps are
    # exact in float32 (spacing u below 1, 2u above): 18u for the 3 x 3 windows of ~450 -> 224 px.
    first_order = kh * kw + kh + kw + 2
    units = first_order - (-first_order * first_order // 2 ** 24)
    eps = 2 * -(-units // 2) * UNIT_ROUNDOFF
    out = (approx * (1 - eps)).half()
    # compared as bit patterns: int16 compares vectorise, float16 ones convert first (NaN, if any, is
    # NaN at both ends and in the reference)
    unsure = np.flatnonzero(out.view(torch.int16).numpy() != (approx * (1 + eps)).half().view(torch.int16).numpy())
    if len(unsure):
        index = torch.from_numpy(unsure)
        plane, oh, ow = index // (size * size), index // size % size, index % size
        out.view(-1)[index] = _reference_means(planes, plane, row_starts[oh], row_lengths[oh],
                                               col_starts[ow], col_lengths[ow]).half()
    return out


def adaptive_windows(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's adaptive pooling windows along one axis: ``(starts, lengths)``, ``(n_out,)`` int64 each;
    output ``o`` averages inputs ``floor(o * n_in / n_out)`` up to ``ceil((o + 1) * n_in / n_out)``."""
    o = torch.arange(n_out)
    starts = o * n_in // n_out
    return starts, ((o + 1) * n_in + n_out - 1) // n_out - starts


def _separable_means(planes: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, H, W)`` contiguous -> ``(n, size, size)`` float32 contiguous: the windows' means, averaged
    over rows first, then over columns (close to torch's, not bit for bit)."""
    rows = _pool_rows(planes, size)  # (n, size, W): output rows
    return _pool_rows(rows.transpose(1, 2).contiguous(), size).transpose(1, 2).contiguous()


def _pool_rows(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(n, H, W)`` contiguous -> ``(n, size, W)`` contiguous: output row ``o`` is the mean of its
    adaptive window of input rows. The columns are the channels of a channels-last ``(n, W, H, 1)``
    view, so the kernel finds each window once for all columns and adds whole vectors."""
    n, h, w = x.shape
    columns_as_channels = x.view(n, h, 1, w).permute(0, 3, 1, 2)  # (n, W, H, 1), strides (H*W, 1, W, W)
    pooled = F.adaptive_avg_pool2d(columns_as_channels, (size, 1))  # (n, W, size, 1), channels-last
    return pooled.permute(0, 2, 3, 1).reshape(n, size, w)


def _reference_means(planes: torch.Tensor, plane: torch.Tensor, top: torch.Tensor, height: torch.Tensor,
                     left: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """The mean of each window ``planes[plane, top:top + height, left:left + width]`` as torch's
    contiguous CPU kernel computes it: float32 sum from 0 in row-major order, ``/ height / width``.
    All arguments ``(m,)`` int64; returns ``(m,)`` float32. Adding 0.0 where a window is shorter
    than the longest leaves a sum unchanged, so all windows run in the same loop."""
    _, h, w = planes.shape
    flat = planes.reshape(-1)
    base = plane * (h * w)
    total = torch.zeros(len(plane), dtype=planes.dtype)
    zero = torch.zeros((), dtype=planes.dtype)
    for dy in range(int(height.max())):
        row = base + (top + dy).clamp(max=h - 1) * w
        for dx in range(int(width.max())):
            value = flat[row + (left + dx).clamp(max=w - 1)]
            total = total + torch.where((dy < height) & (dx < width), value, zero)
    return total / height / width
