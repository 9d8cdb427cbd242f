"""Random augmentation of whole batches on the training device.

Per-sample MONAI transforms in DataLoader workers are what keeps a GPU waiting (MONAI's
fast-training tutorial measured 759 images/s for such a pipeline against 3,304 for the model alone). Here one batch gets all its
spatial changes (flip, rotation, zoom) as one ``affine_grid`` + ``grid_sample`` and its intensity
changes as a few element-wise ops, on the GPU when training runs there. The random draws come
from an explicit ``torch.Generator`` so a resumed run continues the same sequence.
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F

from lung_effnet.config import AugmentConfig


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _chance(n: int, p: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) < p


@overload
def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                  masks: None = None) -> torch.Tensor: ...


@overload
def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                  masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
                  masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: flip, rotation, zoom and shift in one resampling; gain, offset and noise.

    Args:
        x: ``(B, C, H, W)`` float in [0, 1] (fp16/bf16/fp32), on any device.
        cfg: the augmentation settings.
        gen: generator on ``x.device``.
        masks: optional ``(B, 1, H, W)`` lesion masks, moved with the images (the same random
            draws are made with or without them).

    Returns:
        ``(B, C, H, W)`` of ``x``'s dtype, in [0, 1]; with ``masks``, also the moved masks
        ``(B, 1, H, W)`` float in [0, 1] (bilinear: a pixel is lesion above 0.5).
    """
    b, device = x.shape[0], x.device
    work = x.float() if masks is None else torch.cat([x.float(), masks.to(device).float()], 1)
    angle = _uniform(b, -cfg.rotate_deg, cfg.rotate_deg, gen, device) * (math.pi / 180.0)
    scale = _uniform(b, 1.0 - cfg.zoom, 1.0 + cfg.zoom, gen, device)
    spatial_on = _chance(b, cfg.prob, gen, device)
    angle = torch.where(spatial_on, angle, torch.zeros_like(angle))
    scale = torch.where(spatial_on, scale, torch.ones_like(scale))
    flip = torch.where(_chance(b, cfg.flip_prob, gen, device), -1.0, 1.0)
    # the grid spans [-1, 1]: a shift of `translate` of the side is 2 * translate in grid units
    shift_xy = _uniform(2 * b, -2 * cfg.translate, 2 * cfg.translate, gen, device).view(b, 2) * spatial_on[:, None]
    # The grid maps output to input coordinates: zoom in by `scale` = sample a 1/scale window.
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_xy[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift_xy[:, 1]], 1)], 1)
    if bool(spatial_on.any()) or bool((flip < 0).any()):
        grid = F.affine_grid(theta, list(work.shape), align_corners=False)
        work = F.grid_sample(work, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        work, moved_masks = work[:, :-1], work[:, -1:]
    intensity_on = _chance(b, cfg.prob, gen, device).float().view(b, 1, 1, 1)
    gain = 1.0 + _uniform(b, -cfg.intensity_scale, cfg.intensity_scale, gen, device).view(b, 1, 1, 1) * intensity_on
    shift = _uniform(b, -cfg.intensity_shift, cfg.intensity_shift, gen, device).view(b, 1, 1, 1) * intensity_on
    work = work * gain + shift
    if cfg.noise_std > 0:
        noise = torch.randn(work.shape, generator=gen, device=device) * cfg.noise_std
        work = work + noise * intensity_on
    images = work.clamp_(0.0, 1.0).to(x.dtype)
    return images if masks is None else (images, moved_masks)


def mixup(x: torch.Tensor, alpha: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., ICLR 2018): ``lam * x + (1 - lam) * x[perm]``, one ``lam ~ Beta(alpha, alpha)``
    per batch drawn from ``gen`` (so a resumed run draws the same).

    Why offered: with a few dozen patients a network can fit the training slices by recognising
    each patient's anatomy, which tells nothing about a new patient; a blend of two patients' slices
    has no single anatomy to recognise, while a lesion in either stays visible. On the demo's 60
    phantom patients from scratch it did not help (benchmarks/RESULTS.md); off by default.

    Args:
        x: ``(B, C, H, W)`` float.

    Returns:
        ``(mixed x, perm, lam)``: the loss is ``lam * CE(y) + (1 - lam) * CE(y[perm])``.
    """
    device = x.device
    lam = beta_sample(alpha, gen)
    perm = torch.randperm(len(x), generator=gen, device=device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


def beta_sample(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from ``gen`` (torch's Beta takes no generator): Johnk's
    algorithm, ``u^(1/a) / (u^(1/a) + v^(1/a))`` accepted when the sum is at most 1."""
    while True:
        u, v = torch.rand(2, generator=gen, device=gen.device).double().clamp_(1e-12, 1.0).pow(1.0 / alpha).tolist()
        if 0 < u + v <= 1.0:
            return u / (u + v)
