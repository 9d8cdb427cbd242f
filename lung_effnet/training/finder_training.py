"""Train the lesion finder (``models.lesion_finder``) from lesion masks: ``pretrain``'s first step.

The finder learns per pixel, on ``CROP`` px crops of the project's own preprocessed inputs (the tensors
``train`` feeds the classifier), half of them centred near a lesion pixel, with lesion pixels weighted
``POS_WEIGHT`` in the loss (a nodule is ~1% of a crop even when the crop is centred on it). Slice labels
alone do not teach it where a nodule is (benign vs normal 0.40-0.61 against 0.84-0.90 from masks;
benchmarks/RESULTS.md, twelfth session), so only rows with a known mask are used.

Augmentation: flips and quarter turns; grey-level scale, offset and noise as the classifier's training
does; and with probability ``flat`` a crop's context channels all repeat its centre slice, as they do for a
2D source (a JPG has no neighbours), so that the finder also works on those.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lung_effnet.models.lesion_finder import FINDER_WIDTH, finder_network, fold_finder_batchnorm

CROP = 32  # px, side of a training crop (~90 mm at the demo's ~2.8 mm a pixel)
POS_WEIGHT = 5.0
FINDER_STEPS = 3000
FINDER_BATCH = 32
FINDER_FLAT = 0.3  # measured: 0.3 lifted the JPG family's benign vs normal from 0.51 to 0.59 at no cost on the demo


def training_crops(images: torch.Tensor, masks: torch.Tensor, rows: np.ndarray, on_lesion: int,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``CROP`` px crops of ``images[rows]`` and ``masks[rows]``: the first ``on_lesion`` around a random lesion
    pixel of their mask (jittered by up to a quarter crop), the rest anywhere. Out ``(len(rows), C, CROP, CROP)``
    and ``(len(rows), 1, CROP, CROP)``."""
    size = images.shape[-1]
    xs, ms = [], []
    for j, i in enumerate(rows):
        if j < on_lesion:
            ys, xs_ = torch.nonzero(masks[i, 0], as_tuple=True)
            k = int(rng.integers(len(ys)))
            a, b = (int(c[k]) + int(rng.integers(-CROP // 4, CROP // 4 + 1)) for c in (ys, xs_))
        else:
            a, b = (int(v) for v in rng.integers(size, size=2))
        a0, b0 = (int(np.clip(v - CROP // 2, 0, size - CROP)) for v in (a, b))
        xs.append(images[i, :, a0:a0 + CROP, b0:b0 + CROP])
        ms.append(masks[i, :, a0:a0 + CROP, b0:b0 + CROP])
    return torch.stack(xs), torch.stack(ms)


def augment_crops(x: torch.Tensor, m: torch.Tensor, flat: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, a quarter turn, flat context with probability ``flat``, grey-level scale / offset / noise."""
    if rng.random() < 0.5:
        x, m = x.flip(3), m.flip(3)
    if rng.random() < 0.5:
        x, m = x.flip(2), m.flip(2)
    k = int(rng.integers(4))
    x, m = x.rot90(k, (2, 3)).clone(), m.rot90(k, (2, 3))
    if flat > 0:
        pick = torch.from_numpy(rng.random(len(x)) < flat)
        centre = x.shape[1] // 2
        x[pick] = x[pick][:, centre:centre + 1].expand(-1, x.shape[1], -1, -1)
    n = len(x)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    scale = 1 + 0.1 * torch.randn(n, 1, 1, 1, generator=gen)
    offset = 0.05 * torch.randn(n, 1, 1, 1, generator=gen)
    return x * scale + offset + 0.02 * torch.randn(x.shape, generator=gen), m


def train_lesion_finder(images: torch.Tensor, masks: torch.Tensor, steps: int = FINDER_STEPS, batch: int = FINDER_BATCH,
                        flat: float = FINDER_FLAT, seed: int = 0, width: int = FINDER_WIDTH,
                        on_step: Callable[[int, float], None] | None = None, progress: bool = False) -> nn.Sequential:
    """Train a finder on ``images`` ``(N, C, S, S)`` in [0, 1] with lesion ``masks`` ``(N, 1, S, S)`` (0/1; every
    row's mask known, some with a lesion, some without) and return it folded (no BatchNorm), in eval mode.

    AdamW with a one-cycle learning rate (peak 3e-3), ``steps`` batches of ``batch`` crops, half centred on a
    lesion. ``on_step(step, loss)`` is called every 100 steps and at the last (MLflow logging).

    Raises:
        ValueError: no row with a lesion, or none without.
    """
    has_lesion = (masks.flatten(1).amax(1) > 0).numpy()
    lesion, other = np.flatnonzero(has_lesion), np.flatnonzero(~has_lesion)
    if not len(lesion) or not len(other):
        raise ValueError(f"the lesion finder needs slices with and without a lesion mask ({len(lesion)} with, {len(other)} without)")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = finder_network(images.shape[1], width)
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="lesion finder", unit="step", mininterval=2)
    for step in range(steps):
        rows = np.concatenate([rng.choice(lesion, batch // 2), rng.choice(other, batch - batch // 2)])
        xb, mb = augment_crops(*training_crops(images, masks, rows, batch // 2, rng), flat, rng)
        loss = F.binary_cross_entropy_with_logits(net(xb), mb.float(), pos_weight=torch.tensor(POS_WEIGHT))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if on_step is not None and (step % 100 == 0 or step == steps - 1):
            on_step(step, float(loss))
    if bar is not None:
        bar.close()
    return fold_finder_batchnorm(net)
