"""``inference_copy``: the same probabilities as the trained ensemble, in fewer operations."""

import torch
from torch import nn

from lung_effnet.config import load_config
from lung_effnet.models.bn_fold import inference_copy
from lung_effnet.models.predictor import FoldEnsemble, build_member


def _trained_like_member(cfg, seed: int) -> nn.Module:
    """A fold model whose BatchNorm statistics and head are not the identity / zero of a fresh one
    (a folded identity BatchNorm, or a zero head, would hide a wrong fold)."""
    torch.manual_seed(seed)
    member = build_member(cfg)
    for module in member.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.3, 3.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.2)
    nn.init.normal_(member._fc.weight, 0.0, 0.3)
    return member.eval()


def test_folded_ensemble_gives_the_same_probabilities_without_batchnorm_or_symmetric_pads():
    cfg = load_config(None, ["data.image_size=64", "data.context_slices=1"])
    ensemble = FoldEnsemble([_trained_like_member(cfg, seed) for seed in range(2)]).eval()
    before = {k: v.clone() for k, v in ensemble.state_dict().items()}
    fast = inference_copy(ensemble)
    x = torch.rand(6, 3, 64, 64)
    with torch.no_grad():
        expected, got = ensemble(x), fast(x)
    assert (expected.max(1).values - expected.min(1).values).min() > 0.05  # a model that separates classes
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    pads = [m for m in fast.modules() if isinstance(m, nn.ConstantPad2d)]
    # only the asymmetric (stride-2) pads are left
    assert pads and all(m.padding[0] != m.padding[1] or m.padding[2] != m.padding[3] for m in pads)
    assert all(torch.equal(before[k], v) for k, v in ensemble.state_dict().items())  # the original is untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in ensemble.modules())


def test_an_untraceable_model_is_kept_as_it_is():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # control flow on values: FX cannot trace

    model = DataDependent().eval()
    fast = inference_copy(model)
    x = torch.rand(1, 1, 8, 8)
    assert isinstance(fast, DataDependent) and fast is not model
    assert torch.equal(fast(x), model(x))
