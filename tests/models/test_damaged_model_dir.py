"""A damaged model folder (NaN weights, a broken config.yaml or model.json) is one InputError naming the
file, never a traceback from later in scoring."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lung_effnet.errors import InputError
from lung_effnet.models.predictor import load_model_dir


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A copy of the shared tiny model folder, free to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_fold_file(model_copy, value):
    state = torch.load(model_copy / "fold_0.pt", weights_only=True)
    state["_fc.weight"][0, 0] = value
    torch.save(state, model_copy / "fold_0.pt")
    with pytest.raises(InputError, match=r"fold_0\.pt holds NaN or infinite weights"):
        load_model_dir(model_copy)


@pytest.mark.parametrize(("name", "text"), [
    ("config.yaml", "not yaml: ["),
    ("config.yaml", "[1, 2]\n"),
    ("config.yaml", "data: [1, 2]\n"),
    ("config.yaml", "\udcff"),
    ("model.json", "{not json"),
    ("model.json", "[1, 2]"),
])
def test_a_damaged_config_or_model_json_is_one_line_naming_the_file(model_copy, name, text):
    (model_copy / name).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(InputError) as info:
        load_model_dir(model_copy)
    message = str(info.value)
    assert name in message and "\n" not in message, message


def test_the_intact_copy_loads(model_copy):
    assert load_model_dir(model_copy).config.data.image_size == 32
