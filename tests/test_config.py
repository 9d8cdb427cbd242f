import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from lung_effnet.config import RULES, Config, OneOf, Range, load_config, named_config
from lung_effnet.errors import ConfigError


def test_default_yaml_spells_out_the_built_in_defaults():
    assert yaml.safe_load(named_config("default").read_text()) == Config().to_dict()


def test_paper_config_has_the_papers_settings():
    cfg = load_config("paper_b1")
    assert (cfg.model.name, cfg.data.image_size, cfg.train.optimizer, cfg.train.lr) == ("efficientnet-b1", 240, "adam", 1e-3)
    assert (cfg.train.scheduler, cfg.train.plateau_factor, cfg.train.plateau_patience) == ("plateau", 0.3, 5)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.model.drop_connect, cfg.model.dropout) == (32, 50, 0.2, 0.5)


@pytest.mark.parametrize("name", ["default", "paper_b1", "demo_cpu"])
def test_named_configs_load(name):
    assert isinstance(load_config(name), Config)


def test_overrides_are_typed_and_validated():
    cfg = load_config("default", ["train.epochs=3", "train.lr=3e-4", "model.name=efficientnet-b2", "seed=7"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.name, cfg.seed) == (3, 3e-4, "efficientnet-b2", 7)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch: unknown key"),
    ("trian.epochs=3", "trian: unknown key"),
    ("train.epochs=three", "train.epochs: expected int"),
    ("train.lr=-1", "train.lr: must be (0, 1], got -1.0"),
    ("model.name=resnet50", "model.name: must be one of efficientnet-b0,"),
    ("augment.prob=1.5", "augment.prob: must be [0, 1], got 1.5"),
    ("cv.folds=1", "cv.folds"),
    ("train.epochs", "expected key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("default", [override])


def test_unknown_key_in_a_file_is_one_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(err.value).count("\n") == 0 and "train.epochz" in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no_such_config.yaml")


def test_every_key_has_a_range_rule():
    assert set(RULES) == set(Config().flat())


def _outside(rule, default):
    """Values just outside ``rule`` (of the key's type), or none where every value of the type is allowed."""
    if isinstance(rule, Range):
        step = 1 if isinstance(default, int) and not isinstance(default, bool) else 1e-3
        below = [] if rule.lo is None else [rule.lo if rule.open_lo else rule.lo - step]
        above = [] if rule.hi is None else [rule.hi if rule.open_hi else rule.hi + step]
        return [type(default)(v) if isinstance(default, int) else v for v in below + above]
    if isinstance(rule, OneOf):
        return [] if set(rule.values) == {True, False} else ["not-a-choice"]
    return ["  "] if rule.nonempty else []


@pytest.mark.parametrize("key", sorted(RULES))
def test_each_key_rejects_values_outside_its_range_and_names_key_and_value(key):
    """The table test: every config key, each bound of its rule just crossed, must fail with a
    one-line ``ConfigError`` naming the key and the value; the default must pass."""
    rule, default = RULES[key], Config().flat()[key]
    assert default is None or rule.admits(default), (key, default)
    for bad in _outside(rule, default if default is not None else 0.5):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={bad!r}" if isinstance(bad, str) else f"{key}={bad}"])
        text = str(err.value)
        assert text.startswith(f"{key}:") and "\n" not in text, text
        assert str(bad).strip() in text or repr(bad) in text or f"{float(bad):g}" in text, text


def _float_keys() -> list[str]:
    """Keys typed ``float`` or ``float | None``."""
    keys = []
    for section, hint in typing.get_type_hints(Config).items():
        fields = typing.get_type_hints(hint) if dataclasses.is_dataclass(hint) else {"": hint}
        for name, field_hint in fields.items():
            if field_hint is float or float in typing.get_args(field_hint):
                keys.append(f"{section}.{name}" if name else section)
    return sorted(keys)


FLOAT_KEYS = _float_keys()


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", "nan", ".inf", "-.inf", "inf"])
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    """NaN and +-inf pass no range (an unbounded one like ``train.weight_decay`` let ``.inf`` through
    to the optimizer); the error is one line that names the key and says why."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    text = str(err.value)
    assert text.startswith(f"{key}: must be a finite number") and "\n" not in text, text


def test_unbounded_float_keys_exist_to_be_checked():
    """The table above must cover keys whose range has no upper end (where inf was admitted)."""
    assert {"train.weight_decay", "augment.mixup_alpha", "train.lesion_loss_weight", "data.spacing_mm",
            "model.dropout"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("size", ["1", "16", "31"])
def test_image_size_below_32_is_a_one_line_cli_error(tmp_path, capsys, size):
    """EfficientNet downsamples 32x; smaller inputs used to train into a misleading leakage error."""
    from lung_effnet.cli import main

    code = main(["train", "-q", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--set", f"data.image_size={size}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "data.image_size: must be [32, 2048]" in err[0] and f"got {size}" in err[0], err[0]


def test_removed_num_workers_is_ignored_with_a_warning_when_set(tmp_path, caplog):
    """``train.num_workers`` was never read: old configs and model folders still load; a value other
    than the old default 0 says that it is ignored and why."""
    assert "train.num_workers" not in Config().flat() and "train.num_workers" not in RULES
    with caplog.at_level("WARNING", logger="lung_effnet.config"):
        cfg = load_config(None, ["train.num_workers=0"])
    assert cfg == Config() and not caplog.records
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  num_workers: 8\n  epochs: 3\n")
    with caplog.at_level("WARNING", logger="lung_effnet.config"):
        cfg = load_config(old)
    assert cfg.train.epochs == 3
    (record,) = caplog.records
    assert "train.num_workers: removed, ignored (got 8)" in record.getMessage() and "never used" in record.getMessage()
