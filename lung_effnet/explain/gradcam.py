"""Grad-CAM and Grad-CAM++ saliency maps through ``monai.visualize``, done the safe way.

``grad_cam(model, images)`` returns one ``(H, W)`` map in [0, 1] per image, high = important,
each image explained for its own class. Three things MONAI 1.5/1.6 get wrong by default, and how
they are handled here:

- Direction: MONAI's default normalizer maps the maximum to 0. We pass our own postprocessing
  (``scale_to_unit``: divide by the per-image maximum), so 1 is the most important pixel.
- Batching: with ``class_idx=None`` and a batch, MONAI's ``logits[:, argmax]`` picks a (B, B) block
  and back-propagates every image's score through every image's class; Grad-CAM++ multiplies a
  ``(B,)`` score into ``(B, C, h, w)`` gradients along the width. ``_PerImageClassHooks`` scores
  each image for its own class only (``gather``) and returns the score as ``(B, 1, 1, 1)``, which
  fixes both. In eval mode (BatchNorm on running statistics) images do not interact, so a batch
  gives the same maps as one image at a time (tested).
- Hooks: ``ModelWithHooks`` registers hooks it never removes (and turns off ``inplace``). Maps are
  computed on a deep copy of each model, so the caller's model is left exactly as it was.

A ``FoldEnsemble`` (anything with ``.members``) is explained as the mean of its members' maps,
every member explaining the ensemble's class, each member's map scaled to [0, 1] first so every
fold counts the same whatever its gradient scale.

Target layer: ``DEFAULT_TARGET_LAYER`` is ``_blocks.3``, the output of EfficientNet's fourth
stage, at stride 16 (14 x 14 at 224 px, 8 x 8 at 128 px). ``_conv_head``, ``_bn1`` and the last
MBConv block, the usual choices, sit at stride 32 (7 x 7 at 224 px), where every cell already sees
the whole slice: measured with ``benchmarks/bench_cam_layers.py`` on b0s that had learned a
phantom mass (out-of-fold AUROC 0.93; benchmarks/RESULTS.md, "Grad-CAM target layer"), those three
put Grad-CAM's maximum on the lesion no more often than a random point (pointing 0.06 vs chance
0.06), while ``_blocks.3`` hit 0.52 with 4.6 x the lesion's share of the map's energy. The same
stage exists in every EfficientNet variant (b0..b7 have 7 stages). ``_swish`` must not be used: one
module instance serves both the stem and the head, so its hooks fire twice.

A member that reads a lesion finder's map (``models.lesion_finder``) is read at the first stage,
``FINDER_TARGET_LAYER`` (``_blocks.0``, stride 2): the map enters at full resolution and the network
uses it early. Measured with ``benchmarks/saliency_layers.py`` on the demo's seeds 0-2 (chosen there)
and confirmed on seed 3: malignant pointing 0.64-0.79 and benign 0.48-0.71 at ``_blocks.0``, against
0.21-0.48 / 0.14-0.29 at ``_blocks.2`` and 0.46-0.78 / 0.67-0.79 at ``_blocks.1`` (chance 0.04 / 0.02;
RESULTS.md, "Thirteenth session").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp
from monai.visualize.class_activation_maps import ModelWithHooks
from torch import nn

METHODS: dict[str, type[GradCAM]] = {"gradcam": GradCAM, "gradcampp": GradCAMpp}
DEFAULT_TARGET_LAYER = "_blocks.3"  # stride 16: see the module docstring
FINDER_TARGET_LAYER = "_blocks.0"  # stride 2, for members with a lesion finder: see the module docstring
LAYER_ALIASES = ("last_block",)
"""``last_block``: the last MBConv block of an EfficientNet (``_blocks.6.15`` in b0)."""


class _PerImageClassHooks(ModelWithHooks):
    """MONAI's hooked model, scoring each image for its own class.

    ``class_idx`` is a ``(B,)`` int64 tensor; the score is ``(B, 1, 1, 1)`` so that Grad-CAM++'s
    ``score.exp() * grad`` broadcasts per image, and ``score.sum()`` back-propagates each image's
    own logit only.
    """

    def class_score(self, logits: torch.Tensor, class_idx) -> torch.Tensor:
        idx = torch.as_tensor(class_idx, device=logits.device).reshape(-1, 1)
        return logits.gather(1, idx).reshape(-1, 1, 1, 1)

    def __call__(self, x, class_idx=None, retain_graph=False, **kwargs):
        out = super().__call__(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
        # Grad-CAM++ scales each image's weights by exp(score): one positive number per image, which
        # the per-image scaling removes anyway, but which overflows float32 (NaN maps) for a score
        # above ~88 and underflows to all-zero maps below ~-88. Setting it to 1 keeps the maps finite.
        self.score = torch.zeros_like(self.score).detach()
        return out


def scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` non-negative maps -> divided by each map's maximum, so in [0, 1] with 1 at
    the most important pixel; an all-zero map (no positive evidence) stays zero."""
    peak = maps.flatten(1).amax(1).reshape(-1, *([1] * (maps.ndim - 1)))
    # No floor on the peak: an untrained head gives gradients of 1e-14 whose map still has a shape.
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def members_of(model: nn.Module) -> list[nn.Module]:
    """The fold models of an ensemble (``.members``), or ``[model]`` for a single model."""
    members = getattr(model, "members", None)
    return list(members) if members is not None else [model]


def resolve_target_layer(model: nn.Module, target_layer: str | None = None) -> str:
    """The module name to hook in ``model`` (a single member): ``None`` -> ``DEFAULT_TARGET_LAYER``
    (``FINDER_TARGET_LAYER`` for a member with a lesion finder); ``"last_block"`` -> the last MBConv block.
    Raises ``ValueError`` for a name the model lacks."""
    from lung_effnet.models.lesion_finder import has_finder

    names = [name for name, _ in model.named_modules()]
    name = target_layer or (FINDER_TARGET_LAYER if has_finder(model) else DEFAULT_TARGET_LAYER)
    if name == "last_block":
        blocks = [n for n in names if n.startswith("_blocks.") and n.count(".") == 2]
        if not blocks:
            raise ValueError("target_layer='last_block' needs an EfficientNet (no _blocks.<stage>.<block> modules)")
        return blocks[-1]
    if name == "_swish":
        raise ValueError("target_layer '_swish' is shared by the stem and the head of EfficientNetBN; use _conv_head or _bn1")
    if name not in names:
        raise ValueError(f"target_layer {name!r} is not a module of the model (e.g. {', '.join(names[-6:])})")
    return name


def _as_images(images) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(x.shape)}")
    return x.float()


@torch.no_grad()
def predicted_classes(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """``(B,)`` argmax class of ``model`` (logits or ensemble probabilities: same argmax)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def _target_classes(model: nn.Module, x: torch.Tensor, class_idx) -> np.ndarray:
    if class_idx is None:
        return predicted_classes(model, x)
    idx = np.broadcast_to(np.asarray(class_idx, dtype=np.int64), (len(x),)).copy()
    return idx


def _hooked_copy(member: nn.Module, layer: str) -> _PerImageClassHooks:
    """A deep copy in eval mode with gradients on, hooked at ``layer`` (the original is untouched)."""
    clone = copy.deepcopy(member).eval()
    for p in clone.parameters():
        p.requires_grad_(True)  # a frozen model would give no gradient at the layer
    return _PerImageClassHooks(clone, layer, register_forward=True, register_backward=True)


def _member_maps(member: nn.Module, x: torch.Tensor, classes: np.ndarray, layer: str | None, method: str,
                 batch_size: int) -> np.ndarray:
    """``(B, H, W)`` float32 maps in [0, 1] of one model."""
    hooked = _hooked_copy(member, resolve_target_layer(member, layer))
    # MONAI types nn_module as nn.Module, but CAMBase takes a ModelWithHooks as it is (isinstance check)
    cam = METHODS[method](nn_module=hooked, target_layers=hooked.target_layers[0],  # type: ignore[arg-type]
                          postprocessing=scale_to_unit)
    device = next(hooked.model.parameters()).device
    out = []
    with torch.enable_grad():
        for i in range(0, len(x), batch_size):
            batch = x[i:i + batch_size].to(device)
            idx = torch.as_tensor(classes[i:i + batch_size], device=device)
            out.append(cam(batch, class_idx=idx).detach()[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *x.shape[2:]), np.float32)


def grad_cam(model: nn.Module, images, target_layer: str | None = None, class_idx=None, method: str = "gradcam",
             batch_size: int = 32) -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) maps of ``images`` as ``model`` sees them.

    Args:
        model: a fold model (``(B, C, H, W)`` -> ``(B, 3)`` logits), or a ``FoldEnsemble`` (any module
            with ``.members``), explained as the mean of its members' maps.
        images: ``(B, C, H, W)`` float tensor or array, preprocessed as for the model ([0, 1]).
        target_layer: module name in a member (default: `resolve_target_layer`'s), or ``"last_block"``.
        class_idx: ``None`` (each image's predicted class; for an ensemble, the ensemble's), an int
            for all images, or a ``(B,)`` sequence of class indices.
        method: ``"gradcam"`` or ``"gradcampp"``.
        batch_size: images per forward/backward pass (does not change the result).

    Returns:
        ``(B, H, W)`` float32 in [0, 1]: 1 = most important pixel of that image (per member, before
        averaging), 0 = no positive evidence for the class.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    x = _as_images(images)
    classes = _target_classes(model, x, class_idx)
    maps = [_member_maps(m, x, classes, target_layer, method, batch_size) for m in members_of(model)]
    return np.mean(maps, axis=0).astype(np.float32)


def randomized_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every parameter and BatchNorm statistic re-initialised (each
    module's ``reset_parameters``), for the model-parameter randomization test (Adebayo et al. 2018).
    A zero-initialised head would give all-zero gradients, so ``Linear`` layers get PyTorch's random
    init whatever the training config said."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in clone.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return clone


Explainer = Callable[[nn.Module, torch.Tensor, Sequence[int]], np.ndarray]
"""``(model, images (B, C, H, W), classes (B,)) -> maps (B, H, W)``: what the checks call."""


def explainer(target_layer: str | None = None, method: str = "gradcam") -> Explainer:
    """``grad_cam`` with a fixed layer and method, as the ``Explainer`` the checks take."""
    return lambda model, images, classes: grad_cam(model, images, target_layer, classes, method)
