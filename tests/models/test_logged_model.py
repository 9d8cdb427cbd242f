"""The model folder and its MLflow twin load without unpickling anything, check their fold files, and
carry no training image."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import torch

import lung_effnet
from lung_effnet.config import load_config
from lung_effnet.errors import InputError, MissingInputError
from lung_effnet.models.predictor import build_member, load_model_dir, save_model_dir

SETTINGS = ["data.image_size=32", "data.context_slices=0"]


class Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a pickle that creates ``marker`` when it is unpickled."""
    path.unlink(missing_ok=True)
    torch.save({"model": Payload(marker)}, path)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A 2-fold ensemble at 32 px: its folder, and the same logged and registered (``score-safe@candidate``)
    in a sqlite store; returns ``(model_dir, tracking_uri, model_uri, run_id)``."""
    import mlflow

    from lung_effnet.tracking import local_artifact_location, log_model_dir

    root = tmp_path_factory.mktemp("logged")
    cfg = load_config(None, SETTINGS)
    states = []
    for fold in range(2):
        torch.manual_seed(fold)
        states.append(build_member(cfg).state_dict())
    model_dir = save_model_dir(root / "model", cfg, states)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("safe", artifact_location=local_artifact_location(uri))
    with mlflow.start_run(experiment_id=experiment) as run:
        model_uri = log_model_dir(model_dir, register_as="score-safe", alias="candidate")
    return model_dir, uri, model_uri, run.info.run_id


def _artifact_folder(model_uri: str) -> Path:
    """Where a logged model's files are in a local artifact store."""
    import mlflow

    location = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    return Path(unquote(urlparse(location).path))


def test_a_runs_uri_loads_the_folder_s_ensemble(logged, monkeypatch):
    """``models:/name@alias`` and ``models:/<id>``: tests/scoring/test_score.py and tests/test_tracking_server.py."""
    model_dir, uri, _, run_id = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    x = torch.rand(3, 1, 32, 32)
    np.testing.assert_allclose(lung_effnet.load_model(f"runs:/{run_id}/model").predict_proba(x),
                               load_model_dir(model_dir).predict_proba(x), atol=1e-6)


def test_the_logged_model_holds_state_dicts_and_no_input_example(logged):
    """Privacy: an input example would be a patient's image in the registry; the model holds the folder's files."""
    _, _, model_uri, _ = logged
    files = sorted(p.relative_to(_artifact_folder(model_uri)).as_posix() for p in _artifact_folder(model_uri).rglob("*")
                   if p.is_file())
    assert not [f for f in files if "example" in f], files
    assert {"data/model/fold_0.pt", "data/model/fold_1.pt", "data/model/config.yaml", "data/model/model.json"} <= set(files)
    assert not [f for f in files if f.endswith((".pth", ".pkl"))], files  # no pickled module
    assert "input_example" not in (_artifact_folder(model_uri) / "MLmodel").read_text()


@pytest.mark.slow  # MLflow's loader checks the installed packages against the model's: ~10 s on 2 cores
def test_mlflow_s_own_loader_gives_the_same_probabilities(logged, monkeypatch):
    import mlflow.pyfunc

    model_dir, uri, model_uri, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    x = torch.rand(2, 1, 32, 32)
    np.testing.assert_allclose(mlflow.pyfunc.load_model(model_uri).predict(x.numpy()),
                               load_model_dir(model_dir).predict_proba(x), atol=1e-6)


def test_a_planted_fold_file_in_a_logged_model_is_refused_unread(logged, tmp_path, monkeypatch):
    import mlflow

    model_dir, uri, _, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("safe").experiment_id):
        from lung_effnet.tracking import log_model_dir

        model_uri = log_model_dir(model_dir)
    marker = tmp_path / "code-ran"
    plant(_artifact_folder(model_uri) / "data" / "model" / "fold_0.pt", marker)
    with pytest.raises(InputError, match="fold_0.pt: not a fold state dict") as info:
        lung_effnet.load_model(model_uri)
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_a_model_logged_by_0_1_as_a_pickled_module_is_refused_unread(logged, tmp_path, monkeypatch):
    """0.1 logged ``mlflow.pytorch`` models (``data/model.pth``, pickled); loading one unpickled it."""
    import mlflow
    import mlflow.pytorch

    model_dir, uri, _, _ = logged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("safe").experiment_id):
        info = mlflow.pytorch.log_model(torch.nn.Linear(2, 2), name="model", serialization_format="pickle",
                                        extra_files=[str(model_dir / "config.yaml"), str(model_dir / "model.json")],
                                        registered_model_name="legacy", pip_requirements=["torch"])
    mlflow.MlflowClient().set_registered_model_alias("legacy", "old", str(info.registered_model_version))
    marker = tmp_path / "code-ran"
    plant(_artifact_folder(info.model_uri) / "data" / "model.pth", marker)
    with pytest.raises(MissingInputError, match="logged by lung-effnet 0.1 as a pickled PyTorch module") as caught:
        lung_effnet.load_model("models:/legacy@old")
    assert not marker.exists()
    assert "\n" not in str(caught.value)


def test_a_missing_fold_file_is_an_error_naming_it(logged, tmp_path):
    model_dir, _, _, _ = logged
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("config.yaml", "model.json", "fold_0.pt"):
        (copy / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(MissingInputError, match=r"fold_1\.pt missing \(model.json declares 2 folds\)"):
        lung_effnet.load_model(copy)
    (copy / "fold_1.pt").write_bytes((model_dir / "fold_1.pt").read_bytes())
    (copy / "fold_2.pt").write_bytes((model_dir / "fold_1.pt").read_bytes())
    with pytest.raises(InputError, match="fold_2.pt beyond the 2 folds"):
        lung_effnet.load_model(copy)
    (copy / "fold_2.pt").unlink()
    assert len(lung_effnet.load_model(copy).model.members) == 2
