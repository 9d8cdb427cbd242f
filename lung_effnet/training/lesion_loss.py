"""Auxiliary lesion-mask loss: where lesion masks are known, tell the network where the lesion is.

Why: with a few dozen patients, a from-scratch network fits the training slices faster by
recognising each patient's anatomy (global, and different for every patient) than by finding the
lesion (a few percent of the slice), and the class gradient that reaches the backbone through global
pooling is mostly about anatomy. A 1 x 1 convolution on EfficientNet's stage-4 features (the output of
``_blocks.3``, stride 16, the layer Grad-CAM reads) trained to predict "lesion in this cell" puts the
lesion's location into the gradient directly (deep supervision; benchmarks/RESULTS.md measures it).

Only training uses it: the head is not part of the fold model that is saved, scored or explained.
Rows whose mask is unknown (no ``mask_path``) add nothing to this loss; a known empty mask (a
normal patient's slice) teaches "no lesion here".
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_STAGE = 3
"""``model._blocks[3]``: stride 16 (80 channels in b0)."""


class LesionHead(nn.Module):
    """A 1 x 1 convolution from the stage-4 features of ``model`` to one lesion logit per cell, fed
    by a forward hook (the model's own forward is unchanged)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        # nn.Module.__getattr__ is typed Tensor | Module: MONAI's _blocks is an nn.Sequential of stages
        stage = cast(nn.Sequential, cast(nn.Sequential, model._blocks)[FEATURE_STAGE])
        channels = cast(nn.Conv2d, stage[-1]._project_conv).out_channels
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)
        self.features: torch.Tensor | None = None
        self._hook = stage.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self.features = output

    def remove(self) -> None:
        """Detach the hook (after training: the model is used without this head)."""
        self._hook.remove()
        self.features = None

    def loss(self, masks: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of the last forward's cell logits against the masks.

        Args:
            masks: ``(B, 1, S, S)`` lesion masks (> 0.5 inside), augmented like the images.
            known: ``(B,)`` bool, rows whose mask is known.

        Returns:
            A scalar; 0 when no row's mask is known. A cell is "lesion" when any of its pixels is.
        """
        if self.features is None or not bool(known.any()):
            return torch.zeros((), device=masks.device)
        logits = self.conv(self.features[known].float())
        target = F.adaptive_max_pool2d((masks[known] > 0.5).float(), logits.shape[-2:])
        return F.binary_cross_entropy_with_logits(logits, target)
