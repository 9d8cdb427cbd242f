"""An inference-only copy of a fold model: the same function in fewer, cheaper operations.

Batch scoring runs the ensemble over every slice of an archive, so what a forward pass does
that an eval-mode model does not need is paid per slice. In MONAI's EfficientNet that is:

- every BatchNorm after a convolution: in eval mode it is a fixed per-channel affine map, which
  folds into the convolution's weights and bias (``torch.fx.experimental.optimization.fuse``);
- the explicit ``ConstantPad2d`` before each stride-1 convolution ("same" padding built
  TensorFlow-style): when symmetric it is the convolution's own zero padding, which needs no
  padded copy of the feature map. The asymmetric ones (stride 2) stay;
- the lesion finder each member carries (``models.lesion_finder``): the same frozen network in
  every fold of a ``pretrain``-started model, so it runs once for all (``SharedLesionMap``). At
  224 px it is the larger part of the work: 5-fold b0 with the default finder, batch 32, 2 threads,
  248 ms a slice as trained, 103 ms as this copy (``benchmarks/bench_ensemble.py``).

Measured on the development machine (2 cores, 5-fold b0 at 96 px, batch 32): ~30% less time per
slice, probabilities equal to within 6e-8 (float32 rounding; ``tests/models/test_bn_fold.py``).
"""

from __future__ import annotations

import copy
import logging
from typing import cast

import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse

from lung_effnet.models.lesion_finder import SharedLesionMap, shared_finder, without_finder

log = logging.getLogger(__name__)


def inference_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorm folded into the convolutions and symmetric
    zero pads folded into the convolutions' padding; ``model`` is left untouched.

    A fold ensemble (``predictor.FoldEnsemble``) is rewritten member by member; when its members
    carry the same lesion finder, the finder runs once for all of them (``SharedLesionMap``). A model that FX
    cannot trace is returned as a plain eval-mode copy, with a warning: slower, not wrong.
    Input and output as ``model``'s (``(B, C, S, S)`` in, ``(B, 3)`` out); not for training.
    """
    model = copy.deepcopy(model).eval()
    members = getattr(model, "members", None)
    if isinstance(members, nn.ModuleList):
        finder = shared_finder(list(members))
        for k, member in enumerate(members):
            members[k] = _rewrite(without_finder(member) if finder is not None else member)
        return SharedLesionMap(finder, model) if finder is not None else model
    return _rewrite(model)


def _rewrite(model: nn.Module) -> nn.Module:
    try:
        # typed as returning nn.Module, but fuse always returns the fx.GraphModule it traced
        graph_module = cast(fx.GraphModule, fuse(model, inplace=True))
    except Exception as exc:  # noqa: BLE001 - an untraceable model still scores, unoptimised
        log.warning("inference: %s not traceable (%s: %s); scoring with the model as it is",
                    type(model).__name__, type(exc).__name__, str(exc).splitlines()[0][:200])
        return model
    return fold_symmetric_pads(graph_module)


def fold_symmetric_pads(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Remove each zero ``ConstantPad2d`` whose only user is an unpadded ``Conv2d``, giving the
    convolution the same padding instead (only when it is symmetric: ``Conv2d`` pads both sides)."""
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        pad = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(pad, nn.ConstantPad2d) or pad.value != 0 or len(node.users) != 1:
            continue
        (user,) = node.users
        conv = modules.get(user.target) if user.op == "call_module" else None
        left, right, top, bottom = pad.padding
        if (not isinstance(conv, nn.Conv2d) or conv.padding != (0, 0) or conv.padding_mode != "zeros"
                or left != right or top != bottom):
            continue
        conv.padding = (top, left)
        user.replace_input_with(node, node.args[0])
        graph_module.graph.erase_node(node)
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    return graph_module
