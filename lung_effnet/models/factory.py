"""EfficientNet factory: one function (`create_model`) in front of MONAI's EfficientNetBN b0..b7 (2D).

Weights never come from the network. MONAI's ``EfficientNetBN(pretrained=True)`` downloads from GitHub and,
with ``in_channels=1``, silently leaves the stem random; here ImageNet weights come from a local file the
user names (`load_pretrained`), and a 3-channel stem is adapted to 1 channel deliberately, by summing the
RGB filters, and reported.

Shapes: every model takes ``(B, C, H, W)`` float (C = ``in_channels``, 1 for CT slices) and returns
``(B, num_classes)`` logits (``(B, 3)`` for benign / malignant / normal, in ``lung_effnet.CLASSES`` order).
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from monai.networks.nets.efficientnet import EfficientNet, EfficientNetBN, MBConvBlock, efficientnet_params
from torch import nn

from lung_effnet.errors import ConfigError, InputError, MissingInputError
from lung_effnet.models.lesion_finder import FINDER_KEY_PREFIX, has_finder
from lung_effnet.models.weight_files import load_failure, resolve_weights

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = tuple(f"efficientnet-b{i}" for i in range(8))
"""The variants `create_model` builds (MONAI also knows b8 and l2; they have no public 2D weights here)."""

_STEM = "_conv_stem.weight"
_HEAD = ("_fc.weight", "_fc.bias")
# lukemelas/EfficientNet-PyTorch (the files MONAI downloads) numbers blocks flat: `_blocks.7.x`; MONAI
# nests them by stage: `_blocks.3.7.x`. Same tensors, same order.
_NESTED_BLOCK = re.compile(r"^_blocks\.\d+\.(\d+\..+)$")


def _params(name: str) -> tuple[float, float, int, float, float]:
    """(width, depth, resolution, dropout, drop-connect) from MONAI's table, after checking the name."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(MODEL_NAMES)}")
    return efficientnet_params[name]


def native_resolution(name: str) -> int:
    """The input size (pixels per side) the variant was designed for: 224 (b0) ... 600 (b7)."""
    return int(_params(name)[2])


def create_model(
    name: str = "efficientnet-b0",
    in_channels: int = 1,
    num_classes: int = 3,
    dropout: float | None = None,
    drop_connect: float = 0.2,
    pretrained_weights: str | Path | None = None,
) -> nn.Module:
    """Build a 2D MONAI ``EfficientNetBN`` classifier.

    Args:
        name: one of `MODEL_NAMES`.
        in_channels: 1 (a CT slice), 3 (2.5D: a slice and its neighbours, or RGB), plus 1 for a lesion
            finder's map (``models.lesion_finder``).
        num_classes: size of the output, 3 for benign / malignant / normal.
        dropout: dropout rate before the final linear layer; None keeps the variant's default
            (0.2 for b0/b1 ... 0.5 for b6/b7; the Lung-EffNet paper used 0.5).
        drop_connect: stochastic-depth rate; block ``i`` of ``N`` drops its residual branch with
            probability ``drop_connect * i / N`` in training (MONAI's and the paper's scheme).
        pretrained_weights: a local ImageNet state dict in MONAI's naming, loaded by `load_pretrained`
            (the stem adapted to 1 channel, the head skipped when its size differs). None: random init.
            Nothing is ever downloaded.

    Returns:
        The model, in training mode. Input ``(B, in_channels, H, W)`` float (H, W >= 32; the variant's
        `native_resolution` is what it was designed for), output ``(B, num_classes)`` logits.

    Raises:
        ValueError: unknown name, or a parameter out of range.
    """
    _, _, _, default_dropout, _ = _params(name)
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    dropout = default_dropout if dropout is None else dropout
    _check_rate("dropout", dropout)
    _check_rate("drop_connect", drop_connect)

    # pretrained=False always: MONAI's pretrained=True downloads, and skips the stem for 1 channel.
    model = EfficientNetBN(name, pretrained=False, spatial_dims=2, in_channels=in_channels, num_classes=num_classes)
    model._dropout.p = float(dropout)
    set_drop_connect(model, drop_connect)
    if pretrained_weights is not None:
        load_pretrained(model, pretrained_weights, in_channels)
    return model


def _check_rate(what: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")


def mbconv_blocks(model: nn.Module) -> list[MBConvBlock]:
    """The MBConv blocks of a MONAI EfficientNet, in forward order (``model._blocks`` nests them by stage)."""
    # nn.Module.__getattr__ is typed Tensor | Module; MONAI's _blocks is an nn.Sequential of stages
    stages = cast(Iterable[Iterable[MBConvBlock]], model._blocks)
    return [block for stage in stages for block in stage]


def set_drop_connect(model: nn.Module, rate: float) -> None:
    """Set the stochastic-depth rate of every block: ``rate * i / N`` for block ``i`` of ``N``.

    MONAI reads the rate only when it builds the network (``EfficientNetBN`` takes no rate argument and
    uses 0.2), then each block keeps its own ``drop_connect_rate``; changing ``model.drop_connect_rate``
    afterwards has no effect, so every block is set here, with MONAI's linear scaling by depth. A block
    uses its rate only in training and only where it has an identity skip (stride 1, same channels in and
    out): there it drops the whole residual branch of a sample (stochastic depth), scaling the rest.
    """
    _check_rate("drop_connect", rate)
    blocks = mbconv_blocks(model)
    for index, block in enumerate(blocks):
        block.drop_connect_rate = float(rate) * index / len(blocks)
    cast(EfficientNet, model).drop_connect_rate = float(rate)  # a plain attribute, not a Module or Tensor


def load_pretrained(model: nn.Module, path: str | Path, in_channels: int) -> dict:
    """Load a local ImageNet state dict (MONAI EfficientNetBN naming) into ``model``, in place.

    The file is a ``.pth``/``.pt`` holding a state dict, or a dict with a ``state_dict`` key (flat
    block numbering, as in the lukemelas/EfficientNet-PyTorch files MONAI downloads, is also accepted).

    - A 3-channel stem going into a 1-channel model is adapted by summing the RGB filters: the grey
      image ``x`` then gives exactly the stem response the RGB model gives to ``x`` repeated 3 times.
    - A model with a lesion finder (``models.lesion_finder``) takes the file's stem for its image channels
      and zero filters for the finder's map: it starts as exactly the network in the file, and learns
      what the map means in training. The finder itself comes from ``model.lesion_finder``, not from
      this file (any finder tensors in it are left out, and said so).
    - The ``_fc`` head is skipped when its shape differs (1000 ImageNet classes vs 3) or it is absent.
    - Any other missing, unexpected or mismatched key is an error (BatchNorm ``num_batches_tracked``
      counters may be absent: they are bookkeeping, not weights).

    Args:
        model: a model from `create_model` (or any MONAI EfficientNetBN, 2D).
        path: the weights file, or ``builtin:<name>`` (``resolve_weights``).
        in_channels: the model's image channels (1 or 3); with a lesion finder its stem takes one more.

    Returns:
        ``{"adapted_stem": bool, "map_channel_added": bool, "skipped": [keys], "loaded": n_tensors, "path": str,
        "key_format": str, "finder_keys_left_out": n}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be read or is not a state dict (``ConfigError``), or its keys or shapes
            do not fit the model (``InputError``).
    """
    path = resolve_weights(path)
    if not _is_file(path):
        raise MissingInputError(f"pretrained weights file not found: {path}")
    finder = has_finder(model)
    model_in = cast(nn.Conv2d, model._conv_stem).in_channels  # __getattr__ is typed Tensor | Module
    if in_channels + finder != model_in:
        raise ValueError(f"in_channels={in_channels}{' + 1 (the lesion map)' if finder else ''} but the model's "
                         f"stem takes {model_in} channels")
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(FINDER_KEY_PREFIX)}
    source, key_format = _read_state_dict(path, target)
    finder_keys = [k for k in source if k.startswith(FINDER_KEY_PREFIX)]
    for key in finder_keys:  # a fold model's file: its finder is not this model's (model.lesion_finder is)
        source.pop(key)

    adapted_stem = map_channel_added = False
    stem = source.get(_STEM)
    if stem is not None and stem.ndim == 4:
        # image channels are 1 or 3 (2 * context_slices + 1): an even count is the image's plus a finder's map
        has_map = stem.shape[1] % 2 == 0
        image, lesion_map = stem[:, :stem.shape[1] - has_map], stem[:, stem.shape[1] - has_map:]
        if image.shape[1] == 3 and in_channels == 1:
            image, adapted_stem = image.sum(dim=1, keepdim=True), True
        if has_map and not finder:
            raise InputError(f"{path} was pretrained reading a lesion finder's map (its stem takes one channel more "
                             "than the image's): set model.lesion_finder to that finder, or use "
                             "builtin:phantom-b0-96px-2.5d")
        if finder and not has_map:
            lesion_map, map_channel_added = torch.zeros_like(image[:, :1]), True
        source[_STEM] = torch.cat([image, lesion_map], dim=1) if finder else image

    skipped = []
    for key in _HEAD:
        if key not in source or source[key].shape != target[key].shape:
            skipped.append(key)
            source.pop(key, None)

    _check_keys(source, target, set(skipped), path)
    model.load_state_dict(source, strict=False)  # strictness checked above, with better messages
    report = {"adapted_stem": adapted_stem, "map_channel_added": map_channel_added, "skipped": skipped,
              "loaded": len(source), "path": str(path), "key_format": key_format, "finder_keys_left_out": len(finder_keys)}
    log.info("loaded %d tensors from %s%s%s%s%s", len(source), path,
             "; stem adapted from 3 channels to 1 by summing the RGB filters" if adapted_stem else "",
             "; the lesion map's stem filters start at zero" if map_channel_added else "",
             f"; skipped (new, randomly initialised): {', '.join(skipped)}" if skipped else "",
             f"; its {len(finder_keys)} lesion finder tensors left out (model.lesion_finder gives the finder)"
             if finder_keys else "")
    return report


def _is_file(path: Path) -> bool:
    """``path.is_file()``; a folder on the way that cannot be searched is a ``ConfigError`` naming the key."""
    try:
        return path.is_file()
    except OSError as exc:
        raise ConfigError(f"model.pretrained_weights: cannot read {path}: {exc.strerror or type(exc).__name__}") from None


def check_weights(name_or_path: str | Path) -> Path:
    """The file a ``model.pretrained_weights`` setting names, after reading it as a state dict: ``train``
    calls this before any work, so a wrong name or a file that cannot be used stops at once.

    Raises:
        ConfigError: no such built-in name or file, a file that cannot be read (permissions) or that does
            not hold a state dict; one line naming the key and the path.
    """
    path = resolve_weights(name_or_path)
    if not _is_file(path):
        raise ConfigError(f"model.pretrained_weights: file not found: {path}")
    _load_state(path)
    return path


def _load_state(path: Path) -> dict:
    """The dict of tensors in a weights file (at the top, or under ``state_dict``), read with
    ``weights_only=True``; ``ConfigError`` naming ``model.pretrained_weights`` and the path otherwise."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # no read permission, an I/O error
        raise ConfigError(f"model.pretrained_weights: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except Exception as exc:  # pickle, zip and weights-only errors all mean the same thing to the user
        raise ConfigError(f"model.pretrained_weights: cannot read {path} as a PyTorch state dict ({load_failure(exc)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"model.pretrained_weights: {path} does not hold a state dict (a dict of tensors, or one "
                          "under 'state_dict')")
    return obj


def _read_state_dict(path: Path, target: dict) -> tuple[dict[str, torch.Tensor], str]:
    """The file's tensors keyed in MONAI's naming, and which naming the file used."""
    obj = _load_state(path)
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    if any(_NESTED_BLOCK.match(k) for k in state) or not any(k.startswith("_blocks.") for k in state):
        return state, "monai"
    flat_to_nested = {_NESTED_BLOCK.sub(r"_blocks.\1", k): k for k in target if _NESTED_BLOCK.match(k)}
    return {flat_to_nested.get(k, k): v for k, v in state.items()}, "lukemelas"


def _check_keys(source: dict, target: dict, skipped: set[str], path: Path) -> None:
    missing = [k for k in target if k not in source and k not in skipped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in source if k not in target]
    mismatched = [f"{k} {tuple(source[k].shape)} in file vs {tuple(target[k].shape)} in model"
                  for k in source if k in target and source[k].shape != target[k].shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{len(keys)} {what}: {'; '.join(keys[:3])}{more}")
    if problems:
        raise InputError(f"{path} does not fit the model ({' | '.join(problems)}); expected a state dict of the "
                         "same EfficientNet variant in MONAI EfficientNetBN naming")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not); works on models built on the meta device."""
    return sum(p.numel() for p in model.parameters())


def model_summary(name: str, in_channels: int = 1, num_classes: int = 3) -> dict:
    """Facts about a variant for docs and the CLI, without allocating its weights (built on ``meta``)."""
    width, depth, resolution, dropout, drop_connect = _params(name)
    with torch.device("meta"):
        model = create_model(name, in_channels=in_channels, num_classes=num_classes)
    return {
        "name": name,
        "params": count_parameters(model),
        "native_resolution": int(resolution),
        "width_coefficient": width,
        "depth_coefficient": depth,
        "default_dropout": dropout,
        "default_drop_connect": drop_connect,
        "blocks": len(mbconv_blocks(model)),
    }
