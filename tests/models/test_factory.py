"""The EfficientNet factory: registry, shapes, regularisation rates, local ImageNet weights, no network."""

from __future__ import annotations

import socket

import pytest
import torch
from monai.networks.nets import efficientnet as monai_efficientnet
from monai.networks.nets.efficientnet import EfficientNetBN, efficientnet_params

from lung_effnet.models.factory import (
    MODEL_NAMES,
    count_parameters,
    create_model,
    load_pretrained,
    mbconv_blocks,
    model_summary,
    native_resolution,
    set_drop_connect,
)

SIZE = 64  # pixels per side: small enough for 2 CPU cores, large enough for b0's five stride-2 stages


@pytest.fixture(scope="module")
def imagenet_like() -> EfficientNetBN:
    """A 3-channel, 1000-class b0 standing in for ImageNet weights, with non-trivial BN statistics."""
    torch.manual_seed(0)
    model = EfficientNetBN("efficientnet-b0", pretrained=False, in_channels=3, num_classes=1000)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture
def weights_file(tmp_path, imagenet_like):
    path = tmp_path / "efficientnet-b0-imagenet.pth"
    torch.save(imagenet_like.state_dict(), path)
    return path


# ---- registry -------------------------------------------------------------------------------------

def test_registry_names_and_native_resolutions():
    assert MODEL_NAMES == tuple(f"efficientnet-b{i}" for i in range(8))
    assert [native_resolution(n) for n in MODEL_NAMES] == [224, 240, 260, 300, 380, 456, 528, 600]
    assert all(native_resolution(n) == efficientnet_params[n][2] for n in MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_variant_constructs_on_meta_device(name):
    with torch.device("meta"):
        model = create_model(name)
    assert model._conv_stem.weight.is_meta
    assert model._conv_stem.in_channels == 1 and model._fc.out_features == 3
    assert model._dropout.p == efficientnet_params[name][3]
    summary = model_summary(name)
    assert summary["params"] == count_parameters(model) > 1_000_000
    assert summary["native_resolution"] == native_resolution(name)
    assert (summary["width_coefficient"], summary["depth_coefficient"]) == efficientnet_params[name][:2]


def test_parameter_counts_grow_with_the_variant():
    counts = [model_summary(n)["params"] for n in MODEL_NAMES]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert 3.9e6 < counts[0] < 4.1e6  # b0, 1 channel, 3 classes: about 4.0 M


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="efficientnet-b0.*efficientnet-b7"):
        create_model("efficientnet-b9")
    with pytest.raises(ValueError, match="efficientnet-b0"):
        native_resolution("resnet50")


@pytest.mark.parametrize("kwargs", [{"in_channels": 0}, {"in_channels": True}, {"num_classes": 0},
                                    {"dropout": 1.0}, {"dropout": -0.1}, {"drop_connect": 1.0}])
def test_out_of_range_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        create_model(**kwargs)


# ---- forward ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_is_batch_by_three_logits(in_channels):
    torch.manual_seed(0)
    model = create_model(in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, SIZE, SIZE))
    assert out.shape == (2, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- dropout and drop-connect ------------------------------------------------------------------------

def test_dropout_default_and_override():
    assert create_model("efficientnet-b0")._dropout.p == 0.2
    with torch.device("meta"):
        assert create_model("efficientnet-b2")._dropout.p == 0.3
        assert create_model("efficientnet-b6")._dropout.p == 0.5
    assert create_model(dropout=0.5)._dropout.p == 0.5
    assert create_model(dropout=0.0)._dropout.p == 0.0


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_drop_connect_is_set_in_every_block(rate):
    model = create_model(drop_connect=rate)
    blocks = mbconv_blocks(model)
    assert len(blocks) == 16  # b0
    assert [b.drop_connect_rate for b in blocks] == pytest.approx([rate * i / 16 for i in range(16)])
    assert model.drop_connect_rate == rate


def test_drop_connect_changes_training_behaviour():
    """A residual block with rate p returns its input unchanged for about p of the samples in training."""
    model = create_model(drop_connect=0.0)
    block = [b for b in mbconv_blocks(model) if b.stride == 1 and b.in_channels == b.out_channels][-1]
    x = torch.randn(200, block.in_channels, 4, 4)

    def identical_samples() -> int:
        torch.manual_seed(0)
        with torch.no_grad():
            out = block.train()(x)
        return int((out == x).flatten(1).all(dim=1).sum())

    assert identical_samples() == 0
    set_drop_connect(model, 0.95)
    assert block.drop_connect_rate > 0.8
    assert identical_samples() > 140
    with torch.no_grad():  # off in eval mode
        assert not (block.eval()(x) == x).flatten(1).all(dim=1).any()


# ---- local ImageNet weights --------------------------------------------------------------------------

@pytest.mark.parametrize("wrapped", [False, True])
def test_imagenet_weights_load_into_a_grey_three_class_model(tmp_path, imagenet_like, wrapped):
    saved = imagenet_like.state_dict()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": saved, "epoch": 90} if wrapped else saved, path)
    model = create_model(in_channels=1, num_classes=3)
    report = load_pretrained(model, path, in_channels=1)

    assert report["adapted_stem"] is True
    assert report["skipped"] == ["_fc.weight", "_fc.bias"]
    assert report["loaded"] == len(saved) - 2
    loaded = model.state_dict()
    assert torch.equal(loaded["_conv_stem.weight"], saved["_conv_stem.weight"].sum(dim=1, keepdim=True))
    for key, value in saved.items():
        if key not in ("_conv_stem.weight", "_fc.weight", "_fc.bias"):
            assert torch.equal(loaded[key], value), key
    assert loaded["_fc.weight"].shape == (3, 1280)


def test_summed_stem_answers_a_grey_image_like_the_rgb_stem_answers_it_repeated(weights_file, imagenet_like):
    model = create_model(in_channels=1, pretrained_weights=weights_file).eval()
    torch.manual_seed(1)
    grey = torch.rand(2, 1, SIZE, SIZE)
    rgb = grey.repeat(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model._conv_stem(grey), imagenet_like._conv_stem(rgb), atol=1e-5)
        # and so does everything up to the head: the pooled 1280 features
        features = {}
        for tag, net, x in (("grey", model, grey), ("rgb", imagenet_like, rgb)):
            handle = net._dropout.register_forward_hook(lambda m, i, o, tag=tag: features.__setitem__(tag, o))
            net(x)
            handle.remove()
    assert torch.allclose(features["grey"], features["rgb"], atol=1e-4)


def test_three_channel_model_takes_the_stem_as_it_is(weights_file, imagenet_like):
    model = create_model(in_channels=3, num_classes=1000)
    report = load_pretrained(model, weights_file, in_channels=3)
    assert report == {"adapted_stem": False, "map_channel_added": False, "skipped": [],
                      "loaded": len(imagenet_like.state_dict()), "path": str(weights_file), "key_format": "monai",
                      "finder_keys_left_out": 0}
    assert torch.equal(model._fc.weight, imagenet_like._fc.weight)


def test_flat_block_numbering_of_the_lukemelas_files_is_accepted(tmp_path, imagenet_like):
    flat = {}
    for key, value in imagenet_like.state_dict().items():
        parts = key.split(".")
        flat[".".join(parts[:1] + parts[2:]) if key.startswith("_blocks.") else key] = value
    assert "_blocks.15._project_conv.weight" in flat
    path = tmp_path / "efficientnet-b0-355c32eb.pth"
    torch.save(flat, path)
    model = create_model()
    report = load_pretrained(model, path, in_channels=1)
    assert report["key_format"] == "lukemelas" and report["adapted_stem"]
    assert torch.equal(mbconv_blocks(model)[15]._project_conv.weight, mbconv_blocks(imagenet_like)[15]._project_conv.weight)


def test_load_logs_one_info_line(weights_file, caplog):
    with caplog.at_level("INFO", logger="lung_effnet.models.factory"):
        create_model(pretrained_weights=weights_file)
    lines = [r.getMessage() for r in caplog.records if r.name == "lung_effnet.models.factory"]
    assert len(lines) == 1 and "summing the RGB filters" in lines[0] and "_fc.weight" in lines[0]


@pytest.mark.parametrize("damage", ["unexpected", "missing", "shape"])
def test_a_file_that_does_not_fit_is_an_error_naming_the_key(tmp_path, imagenet_like, damage):
    state = dict(imagenet_like.state_dict())
    key = "_blocks.1.1._bn2.weight"
    if damage == "unexpected":
        state["_blocks.1.1._bogus.weight"] = torch.zeros(3)
        key = "_blocks.1.1._bogus.weight"
    elif damage == "missing":
        del state[key]
    else:
        state[key] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        create_model(pretrained_weights=path)


def test_a_file_of_another_variant_is_refused(tmp_path):
    path = tmp_path / "b1.pth"
    torch.save(EfficientNetBN("efficientnet-b1", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="unexpected"):
        create_model("efficientnet-b0", pretrained_weights=path)


def test_a_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="state dict"):
        create_model(pretrained_weights=path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "efficientnet-b0.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        create_model(pretrained_weights=path)


def test_in_channels_must_match_the_model(weights_file):
    with pytest.raises(ValueError, match="in_channels"):
        load_pretrained(create_model(in_channels=1), weights_file, in_channels=3)


def test_building_models_never_touches_the_network(monkeypatch, weights_file):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(monai_efficientnet.model_zoo, "load_url", refuse)  # what MONAI's pretrained=True calls
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for in_channels in (1, 3):
        create_model(in_channels=in_channels)
    create_model(pretrained_weights=weights_file)
    model_summary("efficientnet-b7")


def test_a_weights_file_without_read_permission_is_one_config_error(tmp_path):
    """``check_weights`` (what ``train`` calls first) names the key and the path. Tests run as root, whom
    permissions do not stop: the check runs in a process without the capabilities that bypass them."""
    import os
    import shlex
    import shutil
    import subprocess
    import sys

    weights, hidden = tmp_path / "weights.pt", tmp_path / "closed" / "weights.pt"
    for path in (weights, hidden):
        path.parent.mkdir(exist_ok=True)
        torch.save({"_fc.bias": torch.zeros(3)}, path)
    weights.chmod(0)
    hidden.parent.chmod(0)  # a folder that cannot be searched: Path.is_file() raises there
    code = ("from lung_effnet.models.factory import check_weights\n"
            f"for path in ({str(weights)!r}, {str(hidden)!r}):\n"
            "    try:\n        check_weights(path)\n    except Exception as exc:\n        print(type(exc).__name__, exc)")
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh: a permission cannot be denied")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    hidden.parent.chmod(0o700)
    assert out.stdout.splitlines() == [f"ConfigError model.pretrained_weights: cannot read {path}: Permission denied"
                                       for path in (weights, hidden)], out.stderr[-2000:]
