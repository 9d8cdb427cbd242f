"""The lesion finder: a small frozen network whose lesion map is one more input channel of the classifier.

Why: on small studies the EfficientNet learns malignant masses but tells benign nodules (5-12 mm, a few
pixels at 96 px) from normal slices at chance, with or without slice-level tricks; a fully convolutional
network trained per pixel from lesion masks finds them in the same 96 px inputs (benign vs normal AUROC
0.84-0.90 on demo patients it never saw; benchmarks/RESULTS.md, twelfth session). ``pretrain`` trains it
from the phantoms' masks (``training.finder_training``); a fold model then reads the 2.5D input plus the
finder's map, and learns from its own patients only what the map means.

Where it sits: the finder replaces MONAI EfficientNet's ``_conv_stem_padding`` by `LesionMapInput`, which
concatenates ``sigmoid(finder(x))`` to the input before the stem's padding. Every other module keeps its
MONAI name (Grad-CAM layers, the lesion loss hook, BN folding, TorchScript all see a plain EfficientNetBN),
the input stays ``(B, C, S, S)`` for scoring and the bundle, and the finder's weights travel inside each
fold's state dict (keys ``_conv_stem_padding.finder.*``): a model folder needs no other file.

The finder has no BatchNorm: it is trained with it, then folded into the convolutions
(`fold_finder_batchnorm`), so BatchNorm re-estimation, ``train()`` / ``eval()`` and DDP buffers cannot
move it, and its parameters are frozen (``requires_grad=False``): the classifier's optimiser never sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from lung_effnet.errors import ConfigError
from lung_effnet.models.weight_files import load_failure, resolve_weights

FINDER_WIDTH = 32
"""Channels of the finder's inner layers (42 k parameters for 3 input channels)."""
FINDER_DILATIONS = (1, 1, 2, 4, 8, 1)
"""Stride 1 throughout, 3 x 3 convolutions with these dilations: a receptive field of 35 px (~100 mm at the
demo's ~2.8 mm a pixel), enough to see a nodule against the vessels around it."""
FINDER_KEY_PREFIX = "_conv_stem_padding.finder."
"""Where the finder's tensors sit in a fold model's state dict."""


def finder_network(in_channels: int, width: int = FINDER_WIDTH, batchnorm: bool = True) -> nn.Sequential:
    """``(B, in_channels, S, S)`` in [0, 1] -> ``(B, 1, S, S)`` lesion logits, at every pixel (no downsampling).

    ``batchnorm=True``: the training form (Conv, BatchNorm, ReLU per layer); ``False``: the folded form a fold
    model holds (Conv with bias, ReLU), same module indices for the convolutions.
    """
    layers: list[nn.Module] = []
    channels = [in_channels, width // 2] + [width] * (len(FINDER_DILATIONS) - 1)
    for ci, co, d in zip(channels[:-1], channels[1:], FINDER_DILATIONS):
        layers += [nn.Conv2d(ci, co, 3, padding=d, dilation=d), nn.BatchNorm2d(co) if batchnorm else nn.Identity(), nn.ReLU()]
    layers.append(nn.Conv2d(width, 1, 1))
    return nn.Sequential(*layers)


def fold_finder_batchnorm(trained: nn.Sequential) -> nn.Sequential:
    """The folded form of a trained finder: each BatchNorm (running statistics) merged into the convolution
    before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``); the same function in eval mode, to float rounding."""
    folded: list[nn.Module] = []
    modules = list(trained.eval())
    for i, module in enumerate(modules):
        if isinstance(module, nn.BatchNorm2d):
            folded.append(nn.Identity())
        elif isinstance(module, nn.Conv2d) and i + 1 < len(modules) and isinstance(modules[i + 1], nn.BatchNorm2d):
            folded.append(fuse_conv_bn_eval(module, cast(nn.BatchNorm2d, modules[i + 1])))
        else:
            folded.append(module)
    return nn.Sequential(*folded)


class LesionMapInput(nn.Module):
    """The classifier's input with the finder's lesion map as one more channel, then the stem's padding.

    In ``(B, C, S, S)`` float in [0, 1]; out ``pad((B, C + 1, S, S))``, channel ``C`` = ``sigmoid(finder(x))``
    (lesion probability per pixel).
    """

    def __init__(self, finder: nn.Module, pad: nn.Module):
        super().__init__()
        self.finder = finder
        self.pad = pad
        for p in self.finder.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(torch.cat([x, torch.sigmoid(self.finder(x))], dim=1))


class SharedLesionMap(nn.Module):
    """A fold ensemble whose members read the same finder's map, the map computed once per batch.

    Every fold model carries the finder it was trained with, and a ``pretrain`` finder is the same
    frozen network in all of them; run inside each member, an ensemble of 5 computes the same map 5
    times (at 224 px the finder costs ~4x a b0 forward: it keeps full resolution). Here ``finder``
    runs once and ``ensemble``'s members, their finders taken out (`without_finder`), read its map:
    the same operations on the same values, so the same probabilities.

    In ``(B, C, S, S)`` float in [0, 1]; out ``ensemble``'s output for ``(B, C + 1, S, S)``.
    """

    def __init__(self, finder: nn.Module, ensemble: nn.Module):
        super().__init__()
        self.finder = finder
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ensemble(torch.cat([x, torch.sigmoid(self.finder(x))], dim=1))


def shared_finder(members: list[nn.Module]) -> nn.Sequential | None:
    """The finder of fold models that all carry one with equal weights (what ``pretrain`` gives), or
    ``None`` (no finder, a member without one, or finders that differ: each member keeps its own)."""
    if not members or not all(has_finder(m) for m in members):
        return None
    first = finder_of(members[0]).state_dict()
    for member in members[1:]:
        state = finder_of(member).state_dict()
        if state.keys() != first.keys() or not all(torch.equal(state[k], first[k]) for k in first):
            return None
    return finder_of(members[0])


def without_finder(model: nn.Module) -> nn.Module:
    """``model`` (a fold model with a finder) reading its input's last channel as the map, in place: the
    stem's padding put back where `LesionMapInput` was. In ``(B, C + 1, S, S)``."""
    model._conv_stem_padding = cast(LesionMapInput, model._conv_stem_padding).pad
    return model


def attach_finder(model: nn.Module, in_channels: int) -> nn.Module:
    """Put a (random, frozen) folded finder for ``in_channels`` inputs in front of ``model``'s stem, in place.

    ``model``: a MONAI EfficientNetBN whose stem takes ``in_channels + 1`` channels. Weights: `load_finder`.
    """
    stem = cast(nn.Conv2d, model._conv_stem)
    if stem.in_channels != in_channels + 1:
        raise ValueError(f"the stem takes {stem.in_channels} channels; a finder model needs {in_channels} + 1")
    pad = cast(nn.Module, model._conv_stem_padding)  # nn.Module.__getattr__ is typed Tensor | Module
    model._conv_stem_padding = LesionMapInput(finder_network(in_channels, batchnorm=False), pad)
    return model


def has_finder(model: nn.Module) -> bool:
    """Whether ``model`` (a fold model) reads a lesion finder's map."""
    return isinstance(getattr(model, "_conv_stem_padding", None), LesionMapInput)


def finder_of(model: nn.Module) -> nn.Sequential:
    """The finder network of a fold model that has one."""
    return cast(nn.Sequential, cast(LesionMapInput, model._conv_stem_padding).finder)


def read_finder_state(name_or_path: str | Path) -> dict[str, torch.Tensor]:
    """The folded finder's state dict in a ``model.lesion_finder`` file (``builtin:<name>`` or a path).

    Raises:
        ConfigError: no such file or built-in name, or not a file of tensors; one line naming the setting.
    """
    path = resolve_weights(name_or_path, key="model.lesion_finder")
    if not path.is_file():
        raise ConfigError(f"model.lesion_finder: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, or not tensors: refused unread
        raise ConfigError(f"model.lesion_finder: cannot read {path} as a PyTorch state dict ({load_failure(exc)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.lesion_finder: {path} does not hold a state dict")
    return {k: v.float() for k, v in state.items()}


def load_finder(model: nn.Module, name_or_path: str | Path) -> None:
    """Load a ``model.lesion_finder`` file into ``model``'s finder, in place (``training`` start only: a saved
    fold model carries its finder in its own state dict). A 2.5D (3-channel) finder going into a 1-channel
    model is adapted by summing its first filters over the channels.

    Raises:
        ConfigError: the file is missing or unreadable, or its finder does not fit (another input channel
            count or width); one line naming the setting and the file.
    """
    state = read_finder_state(name_or_path)
    finder = finder_of(model)
    stem, wanted = state.get("0.weight"), cast(nn.Conv2d, finder[0]).in_channels
    if stem is not None and stem.ndim == 4 and stem.shape[1] == 3 and wanted == 1:
        # a 2.5D finder on single slices: a slice is its own neighbours (the flat context it was also trained
        # on), and the summed filters give on x exactly what the 3-channel ones give on x repeated 3 times
        state["0.weight"] = stem.sum(dim=1, keepdim=True)
    try:
        finder.load_state_dict(state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise ConfigError(f"model.lesion_finder: {name_or_path} does not fit this model's finder "
                          f"({lines[1].strip() if len(lines) > 1 else lines[0][:200]}); "
                          "was it trained for another data.context_slices, or another width?") from None
