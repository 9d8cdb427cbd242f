"""The lesion finder: a frozen network whose map is one more input channel of each fold model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lung_effnet.config import load_config
from lung_effnet.errors import ConfigError, InputError
from lung_effnet.explain.gradcam import resolve_target_layer
from lung_effnet.models.bn_fold import inference_copy
from lung_effnet.models.factory import load_pretrained
from lung_effnet.models.lesion_finder import (
    FINDER_KEY_PREFIX,
    SharedLesionMap,
    finder_network,
    finder_of,
    fold_finder_batchnorm,
    has_finder,
    load_finder,
)
from lung_effnet.models.predictor import FoldEnsemble, build_member
from lung_effnet.training.finder_training import train_lesion_finder
from lung_effnet.training.fold import make_optimizer, recalibrate_batchnorm

SETTINGS = ["data.image_size=64"]


def _randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights and BatchNorm statistics away from their initial values (an untrained net hides mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(module.num_features, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
                module.weight.copy_(0.5 + torch.rand(module.num_features, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.num_features, generator=gen))
    return net


@pytest.fixture(scope="module")
def finder_file(tmp_path_factory):
    """A folded 3-channel finder with non-trivial weights, saved as ``pretrain`` saves it."""
    path = tmp_path_factory.mktemp("finder") / "finder.pt"
    torch.manual_seed(1)
    torch.save(fold_finder_batchnorm(_randomise(finder_network(3))).state_dict(), path)
    return path


def test_folding_the_batchnorm_keeps_the_finder_s_function():
    trained = _randomise(finder_network(3)).eval()
    x = torch.rand(2, 3, 40, 40)
    folded = fold_finder_batchnorm(trained)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert folded(x).shape == (2, 1, 40, 40)
    assert torch.allclose(folded(x), trained(x), atol=1e-5)


def test_a_member_reads_the_map_as_one_more_channel_and_keeps_its_input_shape(finder_file):
    cfg = load_config("demo_cpu", SETTINGS + [f"model.lesion_finder={finder_file}"])
    member = build_member(cfg)
    load_finder(member, finder_file)
    assert has_finder(member) and member._conv_stem.in_channels == 4
    x = torch.rand(3, 3, 64, 64)
    seen = []
    member._conv_stem.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    member.eval()(x)
    map_channel = torch.sigmoid(finder_of(member)(x))
    assert torch.equal(seen[0][:, :3, :64, :64], x) and torch.allclose(seen[0][:, 3:, :64, :64], map_channel)
    assert any(k.startswith(FINDER_KEY_PREFIX) for k in member.state_dict())  # the fold file carries it
    assert not has_finder(build_member(load_config("demo_cpu", SETTINGS + ["model.lesion_finder=null"])))


def _finder_members(finder_file, n: int) -> list[torch.nn.Module]:
    """``n`` fold models with the finder of ``finder_file`` and classifiers of their own."""
    cfg = load_config("demo_cpu", SETTINGS + [f"model.lesion_finder={finder_file}"])
    members = []
    for seed in range(n):
        torch.manual_seed(seed)
        member = _randomise(build_member(cfg), seed)
        torch.nn.init.normal_(member._fc.weight, 0.0, 0.3)  # a zero head would hide a wrong input
        load_finder(member, finder_file)
        members.append(member.eval())
    return members


def test_scoring_runs_a_finder_the_folds_share_once_with_the_same_probabilities(finder_file):
    ensemble = FoldEnsemble(_finder_members(finder_file, 3)).eval()
    fast = inference_copy(ensemble)
    calls = []
    for module in fast.modules():
        if isinstance(module, torch.nn.Sequential) and module is not fast:
            module.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected, got = ensemble(x), fast(x)
    assert isinstance(fast, SharedLesionMap) and len(calls) == 1  # one finder, run once a batch
    assert (expected.max(1).values - expected.min(1).values).min() > 0.05
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert all(has_finder(m) for m in ensemble.members)  # the original keeps its members' finders


def test_folds_with_different_finders_each_keep_their_own(finder_file):
    members = _finder_members(finder_file, 2)
    with torch.no_grad():
        finder_of(members[1])[0].weight.mul_(1.5)
    ensemble = FoldEnsemble(members).eval()
    fast = inference_copy(ensemble)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(fast(x), ensemble(x), atol=1e-6, rtol=0)
    assert not isinstance(fast, SharedLesionMap)


def test_training_moves_the_classifier_and_never_the_finder(finder_file):
    cfg = load_config("demo_cpu", SETTINGS + [f"model.lesion_finder={finder_file}"])
    member = build_member(cfg)
    load_finder(member, finder_file)
    torch.nn.init.normal_(member._fc.weight, std=0.1)  # the zero head would give no gradient below it
    before = {k: v.clone() for k, v in member.state_dict().items()}
    optimizer = make_optimizer(member, cfg)
    trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in trainable for p in finder_of(member).parameters())
    member.train()
    loss = torch.nn.functional.cross_entropy(member(torch.rand(8, 3, 64, 64)), torch.arange(8) % 3)
    loss.backward()
    optimizer.step()
    recalibrate_batchnorm(member, torch.rand(16, 3, 64, 64), 8, channels_last=False, amp=False)
    after = member.state_dict()
    finder_keys = [k for k in after if k.startswith(FINDER_KEY_PREFIX)]
    assert finder_keys and all(torch.equal(after[k], before[k]) for k in finder_keys)
    assert not torch.equal(after["_conv_stem.weight"], before["_conv_stem.weight"])


def test_pretrained_weights_without_the_map_start_as_exactly_that_network(finder_file):
    """The built-in image-only weights into a finder model: zero filters for the map, the same outputs."""
    with_map = build_member(load_config("demo_cpu", [f"model.lesion_finder={finder_file}"]))
    load_finder(with_map, finder_file)
    report = load_pretrained(with_map, "builtin:phantom-b0-96px-2.5d", 3)
    assert report["map_channel_added"] and report["skipped"] == []
    plain = build_member(load_config("demo_cpu", ["model.lesion_finder=null"]))
    load_pretrained(plain, "builtin:phantom-b0-96px-2.5d", 3)
    x = torch.rand(4, 3, 96, 96)
    out = with_map.eval()(x)
    assert out.abs().max() > 0.1 and torch.allclose(out, plain.eval()(x), atol=1e-5)


def test_finder_pretrained_weights_into_a_model_without_a_finder_say_what_to_set(tmp_path, finder_file):
    cfg = load_config("demo_cpu", SETTINGS + [f"model.lesion_finder={finder_file}"])
    path = tmp_path / "w.pt"
    torch.save(build_member(cfg).state_dict(), path)
    with pytest.raises(InputError, match="model.lesion_finder"):
        load_pretrained(build_member(load_config("demo_cpu", SETTINGS + ["model.lesion_finder=null"])), path, 3)
    again = build_member(cfg)  # a fold file as pretrained weights: its finder tensors are left out, and said so
    report = load_pretrained(again, path, 3)
    assert report["finder_keys_left_out"] > 0 and not report["map_channel_added"]


def test_a_2_5d_finder_on_single_slices_sums_its_first_filters(finder_file):
    member = build_member(load_config("demo_cpu", SETTINGS + ["data.context_slices=0", f"model.lesion_finder={finder_file}"]))
    load_finder(member, finder_file)
    three = build_member(load_config("demo_cpu", SETTINGS + [f"model.lesion_finder={finder_file}"]))
    load_finder(three, finder_file)
    x = torch.rand(2, 1, 64, 64)
    assert torch.allclose(finder_of(member)(x), finder_of(three)(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_an_unusable_finder_file_is_a_config_error_naming_the_setting(tmp_path, finder_file):
    member = build_member(load_config("demo_cpu", SETTINGS + [f"model.lesion_finder={finder_file}"]))
    with pytest.raises(ConfigError, match="model.lesion_finder: file not found"):
        load_finder(member, tmp_path / "nope.pt")
    wide = tmp_path / "wide.pt"
    torch.save(fold_finder_batchnorm(finder_network(3, width=16)).state_dict(), wide)
    with pytest.raises(ConfigError, match="does not fit this model's finder"):
        load_finder(member, wide)
    with pytest.raises(ConfigError, match="no built-in weights"):
        load_finder(member, "builtin:nope")


def test_grad_cam_reads_a_finder_member_at_its_first_stage(finder_file):
    assert resolve_target_layer(build_member(load_config("demo_cpu", SETTINGS))) == "_blocks.0"
    assert resolve_target_layer(build_member(load_config("demo_cpu", SETTINGS + ["model.lesion_finder=null"]))) == "_blocks.3"
    assert resolve_target_layer(build_member(load_config("demo_cpu", SETTINGS)), "_blocks.4") == "_blocks.4"


def test_the_finder_learns_to_mark_small_discs_from_their_masks():
    """Small bright discs on a textured background: trained on some images' masks, the finder's maximum
    ranks unseen images with a disc above those without (an untrained or broken trainer does not)."""
    rng = np.random.default_rng(0)

    def images(n: int):
        x = 0.3 + 0.1 * rng.random((n, 3, 48, 48))
        m = np.zeros((n, 1, 48, 48))
        yy, xx = np.mgrid[:48, :48]
        has = np.arange(n) % 2 == 0
        for i in np.flatnonzero(has):
            cy, cx = rng.integers(8, 40, size=2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 4
            x[i, :, disc] += 0.3
            m[i, 0, disc] = 1
        for i in range(n):  # distractors as bright as a disc: lines, in every image
            x[i, :, rng.integers(48), :] += 0.3
        return torch.tensor(x, dtype=torch.float32), torch.tensor(m, dtype=torch.float32), has

    x, m, _ = images(64)
    finder = train_lesion_finder(x, m, steps=150, batch=16, seed=0, width=16)
    test_x, _, has = images(40)
    with torch.no_grad():
        score = torch.sigmoid(finder(test_x)).flatten(1).amax(1).numpy()
    assert roc_auc_score(has, score) >= 0.9
