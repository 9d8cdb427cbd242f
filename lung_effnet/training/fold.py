"""One fold's training loop: balanced batches, batched augmentation, AMP on CUDA, early stopping
on validation macro AUROC, a checkpoint every epoch, and resume to the same result.

Before every evaluation the BatchNorm statistics are re-estimated with the current weights
(``recalibrate_batchnorm``). Without it a from-scratch run evaluates with running averages that lag
weights changing fast at the start of training; through EfficientNet's 49 BatchNorm layers that
lag is enough to collapse eval-mode predictions to one class for most of a short run, while the
same network in train mode already separates the classes (benchmarks/RESULTS.md).

The training images live as one ``(N, C, S, S)`` float16 tensor (from the cache), moved to the GPU
once when there is room, so a step is: index a batch, augment it on the device, forward/backward.

Under torchrun (``training.distributed``) a fold trains data-parallel and its global batch is the
single process's: every rank draws the same balanced row order and the same augmentation from the
same seeded generators, builds the whole batch, and trains on its strided share (``rank_share``);
DDP averages the gradients. Rank 0 alone re-estimates BatchNorm, validates and writes checkpoints,
and sends the metrics to every rank, so that all take the same early-stopping decision.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lung_effnet.classes import CLASSES
from lung_effnet.config import Config
from lung_effnet.errors import ConfigError, InputError
from lung_effnet.models.weight_files import load_failure
from lung_effnet.training import distributed
from lung_effnet.training.augment import augment_batch, mixup
from lung_effnet.training.lesion_loss import LesionHead

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """A fold's tensors: images ``(N, C, S, S)`` float16 in [0, 1], labels ``(N,)`` int64; for the
    auxiliary lesion loss, optionally the training masks ``(N, 1, S, S)`` uint8 and which of them
    are known ``(N,)`` bool."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    train_masks: torch.Tensor | None = None
    train_mask_known: torch.Tensor | None = None

    @property
    def has_masks(self) -> bool:
        return self.train_masks is not None and self.train_mask_known is not None and bool(self.train_mask_known.any())

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FoldData:
        """A copy with ``fn`` applied to every tensor (absent masks stay ``None``)."""
        def optional(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)

        return FoldData(fn(self.train_x), fn(self.train_y), fn(self.val_x), fn(self.val_y),
                        optional(self.train_masks), optional(self.train_mask_known))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Asking for ``cuda`` without one is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda', but no CUDA device is available")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context on CPU (fp32 there, deterministic)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64, amp: bool = True) -> np.ndarray:
    """Class probabilities ``(N, 3)`` float64 for images ``(N, C, S, S)`` in [0, 1]."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float()
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, len(CLASSES)))
    return torch.cat(out).double().numpy()


def class_counts(y: torch.Tensor) -> torch.Tensor:
    return torch.bincount(y.cpu(), minlength=len(CLASSES)).float()


def epoch_order(y: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Row order for one epoch: a permutation, or (``sampler``) N draws with replacement where
    every class is equally likely, so rare classes are seen as often as common ones."""
    n = len(y)
    if mode != "sampler":
        return torch.randperm(n, generator=gen)
    counts = class_counts(y)
    weights = (1.0 / counts.clamp(min=1))[y.cpu()]
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def rank_share(n: int, rank: int, world: int) -> slice:
    """The rows of a global batch of ``n`` that rank ``rank`` of ``world`` trains on: every ``world``-th
    row from row ``rank``. The shares are disjoint and together are the batch; when ``world`` does not
    divide ``n`` they differ by one row (``FoldTrainer.train_epoch`` weights each rank's loss by its
    share, so the averaged gradient is the whole batch's). A stride through a balanced draw
    (``epoch_order``) is itself a balanced draw: the class balancing holds on every rank."""
    return slice(rank, n, world)


def make_optimizer(model: torch.nn.Module, cfg: Config, extra: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """Adam(W) over the model's trainable parameters and those of ``extra`` (the training-only lesion head);
    frozen ones (a lesion finder's) are left out, so weight decay cannot move them either."""
    cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    params = [p for p in list(model.parameters()) + (list(extra.parameters()) if extra is not None else [])
              if p.requires_grad]
    return cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def make_scheduler(optimizer, cfg: Config, steps_per_epoch: int):
    """Cosine decay per step after a linear warmup, or reduce-on-plateau on validation AUROC."""
    t = cfg.train
    if t.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=t.plateau_factor, patience=t.plateau_patience)
    if t.scheduler == "none":
        return None
    warmup, total = t.warmup_epochs * steps_per_epoch, max(1, t.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recalibration_batches(n: int, batch_size: int) -> list[slice]:
    """Consecutive batches over ``n`` rows, never a last batch of one (BatchNorm needs two values)."""
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds.pop(-2)  # fold a single trailing row into the batch before it
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b - a >= 2]


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, batch_size: int, channels_last: bool,
                          amp: bool) -> None:
    """Set every BatchNorm's running mean and variance to their average over ``images`` under the
    current weights ("precise BN", Wu & Johnson 2021), in place.

    ``images``: ``(N, C, S, S)`` in [0, 1], unaugmented (what evaluation sees). Only the BatchNorm
    layers run in train mode; dropout and drop-connect stay off, so no random numbers are drawn and
    a resumed run stays identical.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    batches = recalibration_batches(len(images), batch_size)
    if not norms or not batches:
        return
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
        norm.train()
    device = next(model.parameters()).device
    for batch in batches:
        x = images[batch].to(device, non_blocking=True).float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)


def plain(obj):
    """``obj`` with NumPy scalars and arrays turned into Python numbers and tensors, so that
    ``torch.load(..., weights_only=True)`` reads it back (that loader takes tensors, dicts, lists, tuples,
    strings and numbers only). Containers with nothing to change come back as they are (a state dict
    keeps its ``_metadata``)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        items = {k: plain(v) for k, v in obj.items()}
        return obj if all(items[k] is v for k, v in obj.items()) else {**items}
    if isinstance(obj, (list, tuple)):
        values = [plain(v) for v in obj]
        return obj if all(a is b for a, b in zip(values, obj)) else type(obj)(values)
    return obj


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_fold_file(path: Path, load: Callable):
    """``load()``, with a damaged or unreadable file of a run folder (``best.pt``, ``predictions.npy``)
    as one ``InputError`` that names it and says how to get past it."""
    try:
        return load()
    except Exception as exc:  # truncated, not this format, refused by weights_only, unreadable
        reason = load_failure(exc) if not isinstance(exc, OSError) else (exc.strerror or type(exc).__name__)
        raise InputError(f"{path}: damaged or unreadable ({reason}); delete it to retrain that fold "
                         f"({path.parent.name})") from None


def load_best_state(path: Path, device) -> dict:
    """The ``best.pt`` state dict of a fold folder (see ``load_fold_file``)."""
    state = load_fold_file(path, lambda: torch.load(path, map_location=device, weights_only=True))
    if not isinstance(state, dict):
        raise InputError(f"{path}: not a state dict ({type(state).__name__}); delete it to retrain that fold "
                         f"({path.parent.name})")
    return state


class TrainBatch(NamedTuple):
    """A training batch on the training device: ``x`` ``(B, C, S, S)`` float32 augmented, ``y``
    ``(B,)`` labels; ``masks`` ``(B, 1, S, S)`` and ``known`` ``(B,)`` where the lesion loss is on;
    for mixup ``y_mix`` ``(B,)``, the labels of the rows mixed in, and ``lam`` (``None``, 1.0 without).
    Under torchrun, this rank's share of the global batch (``rank_share``)."""

    x: torch.Tensor
    y: torch.Tensor
    masks: torch.Tensor | None
    known: torch.Tensor | None
    y_mix: torch.Tensor | None
    lam: float

    def share(self, rank: int, world: int) -> TrainBatch:
        """The rows of this batch that rank ``rank`` of ``world`` trains on (``rank_share``)."""
        rows = rank_share(len(self.y), rank, world)

        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return TrainBatch(self.x[rows], self.y[rows], part(self.masks), part(self.known), part(self.y_mix), self.lam)


class FoldTrainer:
    """Trains one fold; ``fold_dir`` holds ``last.pt`` (full state, every epoch) and ``best.pt``.

    Under torchrun every rank builds one with the same arguments (the same model seed, data and
    ``seed``); they train together and rank 0 alone writes ``fold_dir``.

    Raises:
        ConfigError: under torchrun, ``train.batch_size`` (the global batch) gives a rank fewer than
            2 rows (BatchNorm needs two).
    """

    def __init__(self, model: torch.nn.Module, data: FoldData, cfg: Config, fold_dir: Path, seed: int):
        self.cfg, self.fold_dir, self.seed = cfg, Path(fold_dir), seed
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if self.world > 1 and cfg.train.batch_size < 2 * self.world:
            raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is the global batch, split over {self.world} "
                              f"processes, and each needs 2 rows at least: set it to {2 * self.world} or more")
        self.device = distributed.rank_device(resolve_device(cfg.train.device))
        self.model = model.to(self.device)
        if cfg.train.channels_last:  # NHWC: faster convolutions on CUDA and, with oneDNN, ~2x on CPU
            # torch's stub of Module.to lacks memory_format, which Module.to accepts at run time
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # what a training step calls: the model itself, or under torchrun the DDP wrapper around it
        self.network = distributed.data_parallel(self.model, self.device) if self.world > 1 else self.model
        self.data = self._place(data)
        use_lesion_loss = cfg.train.lesion_loss_weight > 0 and data.has_masks
        self.lesion_head = LesionHead(self.model).to(self.device) if use_lesion_loss else None
        if self.world > 1:
            if self.lesion_head is not None:  # trained beside DDP, not in it: it starts from rank 0's weights too
                distributed.copy_from_main(self.lesion_head.parameters())
            torch.manual_seed(seed + self.rank)  # each rank its own dropout / drop-connect draws from here on
        self.optimizer = make_optimizer(self.model, cfg, self.lesion_head)
        self.steps_per_epoch = max(1, len(data.train_y) // cfg.train.batch_size)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        weights = None
        if cfg.train.class_balance == "weights":
            counts = class_counts(data.train_y)
            weights = (counts.sum() / (len(CLASSES) * counts.clamp(min=1))).to(self.device)
        self.loss_weights = weights
        self.sample_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        # A fixed subset of the training images for BatchNorm recalibration (same every epoch).
        limit = min(cfg.train.bn_recalibration_images, len(data.train_y))
        self.recalibration_rows = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed + 2))[:limit]
        self.epoch, self.best_score, self.best_epoch, self.bad_epochs = 0, -math.inf, -1, 0
        self.history: list[dict] = []

    def _place(self, data: FoldData) -> FoldData:
        """Keep the whole fold on the GPU when it fits in a quarter of free memory; else pin it."""
        if self.device.type != "cuda":
            return data
        need = sum(t.numel() * t.element_size() for t in (data.train_x, data.val_x))
        free, _ = torch.cuda.mem_get_info(self.device)
        if need < free / 4:
            return data.map_tensors(lambda t: t.to(self.device))
        return data.map_tensors(lambda t: t.pin_memory())

    # -- checkpoints --------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything ``resume`` needs, as tensors and plain containers of numbers (``plain``), so that
        ``last.pt`` loads with ``torch.load(..., weights_only=True)``: nothing in it is unpickled as code."""
        return plain({
            "epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sample_gen": self.sample_gen.get_state(), "aug_gen": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(), "best_score": self.best_score, "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs, "history": self.history,
            "lesion_head": self.lesion_head.state_dict() if self.lesion_head is not None else None,
        })

    def resume(self) -> bool:
        """Continue from ``last.pt`` if a previous run left one. Returns whether it did.

        Raises:
            InputError: ``last.pt`` is not a checkpoint this loop wrote (it is refused unread, never
                unpickled); delete it to train the fold again from its start.
        """
        path = self.fold_dir / "last.pt"
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # anything but tensors and plain containers is refused here, as is a damaged file
            raise InputError(f"{path}: not a checkpoint lung-effnet can resume from ({load_failure(exc)}); "
                             "delete it to train this fold again") from None
        self.model.load_state_dict(state["model"])
        if self.lesion_head is not None and state.get("lesion_head") is not None:
            self.lesion_head.load_state_dict(state["lesion_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sample_gen.set_state(state["sample_gen"])
        self.aug_gen.set_state(state["aug_gen"])
        if self.rank == 0:  # rank 0's stream (ranks > 0 keep the one they were seeded with: see __init__)
            torch.set_rng_state(state["torch_rng"])
        for key in ("epoch", "best_score", "best_epoch", "bad_epochs", "history"):
            setattr(self, key, state[key])
        log.info("resumed %s at epoch %d", self.fold_dir.name, self.epoch)
        return True

    # -- the loop -----------------------------------------------------------------------------
    def batches(self) -> Iterator[TrainBatch]:
        """One epoch of training batches, ready for the model: the data path of ``train_epoch``
        without the model (``benchmarks/bench_train.py`` row (d) times it alone).

        Balanced (or shuffled) sampling on the CPU, the rows gathered where the fold lives (the GPU
        when it fits there), moved to the training device, augmented there in one batched
        resampling (``augment_batch``), mixed up when configured, NHWC when configured. Under
        torchrun each rank builds the whole global batch (the same draws on every rank) and yields
        its share (``TrainBatch.share``).
        """
        cfg, d = self.cfg, self.data
        order = epoch_order(d.train_y, cfg.train.class_balance, self.sample_gen)
        for step in range(self.steps_per_epoch):
            idx = order[step * cfg.train.batch_size:(step + 1) * cfg.train.batch_size]
            idx = idx.to(d.train_x.device)
            x = d.train_x[idx].to(self.device, non_blocking=True)
            y = d.train_y[idx].to(self.device, non_blocking=True)
            masks: torch.Tensor | None = None
            known: torch.Tensor | None = None
            if self.lesion_head is not None:
                # the head exists only when the fold has masks (``FoldData.has_masks``)
                assert d.train_masks is not None and d.train_mask_known is not None
                x, masks = augment_batch(x, cfg.augment, self.aug_gen, masks=d.train_masks[idx])
                known = d.train_mask_known[idx].to(self.device)
            else:
                x = augment_batch(x, cfg.augment, self.aug_gen)
            x, y_mix, lam = x.float(), None, 1.0
            if cfg.augment.mixup_alpha > 0:
                x, perm, lam = mixup(x, cfg.augment.mixup_alpha, self.aug_gen)
                y_mix = y[perm]
                if masks is not None:  # the blend shows both slices' lesions
                    assert known is not None  # set with masks, above
                    masks, known = torch.maximum(masks, masks[perm]), known & known[perm]
            batch = TrainBatch(x, y, masks, known, y_mix, lam)
            if self.world > 1:
                batch = batch.share(self.rank, self.world)
            if cfg.train.channels_last:
                batch = batch._replace(x=batch.x.contiguous(memory_format=torch.channels_last))
            yield batch

    def train_epoch(self) -> float:
        """One epoch over ``batches``: forward, loss (+ the lesion loss), backward, step. Returns
        the mean training loss (over all ranks' rows under torchrun)."""
        cfg = self.cfg
        self.network.train()
        total, n = 0.0, 0
        for batch in self.batches():
            with autocast_for(self.device, cfg.train.amp):
                logits = self.network(batch.x)
            loss = self.loss(logits, batch.y)
            if batch.y_mix is not None:
                loss = batch.lam * loss + (1.0 - batch.lam) * self.loss(logits, batch.y_mix)
            if self.lesion_head is not None:
                assert batch.masks is not None and batch.known is not None  # set with the head
                loss = loss + cfg.train.lesion_loss_weight * self.lesion_head.loss(batch.masks, batch.known)
            self.optimizer.zero_grad(set_to_none=True)
            if self.world > 1:  # DDP averages over ranks: a share's weight is its rows over the mean share
                (loss * (len(batch.y) * self.world / cfg.train.batch_size)).backward()
                if self.lesion_head is not None:
                    distributed.average_gradients(self.lesion_head.parameters())
            else:
                loss.backward()
            self.optimizer.step()
            if self.scheduler is not None and cfg.train.scheduler == "cosine":
                self.scheduler.step()
            total += float(loss.detach()) * len(batch.y)
            n += len(batch.y)
        if self.world > 1:
            total, rows = distributed.sum_across_ranks([total, n], self.device)
            return total / max(rows, 1)
        return total / max(n, 1)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``(B, 3)`` logits against ``(B,)`` labels, class-weighted and smoothed as configured."""
        return F.cross_entropy(logits.float(), y, weight=self.loss_weights, label_smoothing=self.cfg.train.label_smoothing)

    def recalibrate(self) -> None:
        """Re-estimate BatchNorm statistics on the fixed training subset (see module docstring)."""
        if len(self.recalibration_rows):
            rows = self.recalibration_rows.to(self.data.train_x.device)
            recalibrate_batchnorm(self.model, self.data.train_x[rows], self.cfg.train.batch_size,
                                  self.cfg.train.channels_last, self.cfg.train.amp)

    def evaluate(self) -> dict:
        """After an epoch: BatchNorm re-estimated (when the model is evaluated now, or kept), then
        ``validate``. Rank 0's work under torchrun (``fit`` sends the result to every rank)."""
        if len(self.data.val_y) or self.epoch + 1 == self.cfg.train.epochs:  # evaluated now, or kept as the model
            self.recalibrate()
        return self.validate()

    def validate(self) -> dict:
        from lung_effnet.training.metrics import classification_metrics

        d = self.data
        if len(d.val_y) == 0:
            return {}
        proba = predict_proba(self.model, d.val_x, amp=self.cfg.train.amp)
        y = d.val_y.cpu().numpy()
        metrics = classification_metrics(y, proba)
        metrics["loss"] = float(F.nll_loss(torch.log(torch.from_numpy(proba).clamp(min=1e-7)), torch.from_numpy(y)))
        return metrics

    def fit(self, on_epoch=None, progress: bool = True) -> dict:
        """Train until ``train.epochs`` or early stopping; leave the best weights in the model.

        ``on_epoch(epoch, metrics)`` is called after each epoch (MLflow logging).
        Returns ``{"best_epoch", "best_val_auroc", "epochs_run", "history"}``.

        Under torchrun every rank calls it: rank 0 evaluates and sends the metrics to all, so every
        rank takes the same early-stopping decision; rank 0 alone writes ``fold_dir``, shows progress
        and calls ``on_epoch``; every rank ends with the best weights.
        """
        from tqdm import tqdm  # text bars, in notebooks too (tqdm.auto needs ipywidgets there)

        cfg, main = self.cfg.train, self.rank == 0
        if main:
            self.fold_dir.mkdir(parents=True, exist_ok=True)
        self.resume()
        bar = tqdm(total=cfg.epochs, initial=self.epoch, desc=self.fold_dir.name, unit="epoch",
                   disable=not (progress and main), leave=False)
        while self.epoch < cfg.epochs and self.bad_epochs < cfg.early_stopping_patience:
            train_loss = self.train_epoch()
            val = distributed.on_main(self.evaluate)
            # Without validation patients, the last epoch is kept (score rises with the epoch).
            score = val.get("auroc_macro", float("nan")) if val else float(self.epoch)
            score = -val["loss"] if val and not np.isfinite(score) else score
            if self.scheduler is not None and cfg.scheduler == "plateau":
                self.scheduler.step(score)
            record = {"epoch": self.epoch, "train_loss": train_loss, "lr": self.optimizer.param_groups[0]["lr"],
                      **{f"val_{k}": v for k, v in val.items() if k in ("loss", "auroc_macro", "accuracy", "balanced_accuracy")}}
            self.history.append(record)
            if score > self.best_score:
                self.best_score, self.best_epoch, self.bad_epochs = score, self.epoch, 0
                if main:
                    _save_atomic(self.model.state_dict(), self.fold_dir / "best.pt")
            else:
                self.bad_epochs += 1
            self.epoch += 1
            if main:
                _save_atomic(self.state(), self.fold_dir / "last.pt")
            if on_epoch is not None and main:
                on_epoch(record["epoch"], record)
            bar.update(1)
            postfix = {"loss": f"{train_loss:.3f}"}
            if val:
                postfix["val_auroc"] = f"{val.get('auroc_macro', float('nan')):.3f}"
            bar.set_postfix(postfix)
        bar.close()
        if self.lesion_head is not None:
            self.lesion_head.remove()
        distributed.barrier()  # rank 0's best.pt is written before any rank reads it
        self.model.load_state_dict(load_best_state(self.fold_dir / "best.pt", self.device))
        return {"best_epoch": self.best_epoch, "best_val_auroc": self.best_score, "epochs_run": self.epoch, "history": self.history}
