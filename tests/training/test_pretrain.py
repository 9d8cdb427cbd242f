"""The pretrain stage: phantoms -> one model -> weights ``train`` can start from, tracked in MLflow."""

from __future__ import annotations

import json

import torch

from lung_effnet.cli import main
from lung_effnet.config import load_config
from lung_effnet.models.factory import load_pretrained
from lung_effnet.models.lesion_finder import FINDER_KEY_PREFIX, load_finder
from lung_effnet.models.predictor import build_member
from lung_effnet.models.weight_files import BUILTIN_DIR, resolve_weights
from lung_effnet.training.cv import initial_member

TINY = ["data.image_size=32", "train.epochs=1", "train.batch_size=8", "tracking.experiment=pretrain-test"]


def test_pretrain_writes_weights_train_can_start_from(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["pretrain", "-q", "--out", str(tmp_path / "pre"), "--patients", "6", "--seed", "5", "--tracking-uri", uri,
            "--set", "model.pretrained_weights=null", "--finder-steps", "20"]
    assert main(args + [f"--set={s}" for s in TINY]) == 0
    summary = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert summary["patients"] == 6 and summary["slices"] > 6 and len(summary["train_loss"]) == 1
    assert summary["lesion_finder"] == str(tmp_path / "pre" / "lesion_finder.pt")
    cfg = load_config("demo_cpu", TINY + [f"model.pretrained_weights={tmp_path / 'pre' / 'weights.pt'}",
                                          f"model.lesion_finder={summary['lesion_finder']}"])
    member = initial_member(cfg)  # what train starts each fold from
    saved = torch.load(tmp_path / "pre" / "weights.pt", weights_only=True)
    assert not any(k.startswith(FINDER_KEY_PREFIX) for k in saved)  # the finder is its own file
    finder = torch.load(tmp_path / "pre" / "lesion_finder.pt", weights_only=True)
    state = member.state_dict()
    assert all(torch.equal(state[FINDER_KEY_PREFIX + k], v) for k, v in finder.items())
    assert all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in saved.items())  # the whole network, head included

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain-test-pretrain").experiment_id])
    assert run.data.params["pretrain.patients"] == "6" and "train_loss" in run.data.metrics
    assert run.data.params["pretrain.finder_steps"] == "20" and "finder_loss" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "pretrain")} == {
        "pretrain/pretrain.json", "pretrain/weights.pt", "pretrain/lesion_finder.pt"}


def test_builtin_weights_ship_with_the_package_and_fit_the_demo_model():
    cfg = load_config("demo_cpu")
    for name in (cfg.model.pretrained_weights, cfg.model.lesion_finder, "builtin:phantom-b0-96px-2.5d"):
        assert resolve_weights(name).parent == BUILTIN_DIR
    member = build_member(cfg)
    load_finder(member, cfg.model.lesion_finder)
    report = load_pretrained(member, cfg.model.pretrained_weights, 2 * cfg.data.context_slices + 1)
    assert report["skipped"] == [] and report["loaded"] > 300 and not report["map_channel_added"]
    plain = load_config("demo_cpu", ["model.lesion_finder=null", "model.pretrained_weights=builtin:phantom-b0-96px-2.5d"])
    assert load_pretrained(build_member(plain), plain.model.pretrained_weights, 3)["skipped"] == []


def test_an_unknown_builtin_name_is_one_clear_line(tmp_path, capsys):
    code = main(["train", "-q", "--config", "demo_cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", "model.pretrained_weights=builtin:nope"])
    err = capsys.readouterr().err
    assert code == 2 and "builtin:nope" in err and len(err.strip().splitlines()) == 1


def test_a_missing_lesion_finder_stops_train_at_once_in_one_line(tmp_path, capsys):
    code = main(["train", "-q", "--config", "demo_cpu", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--set", f"model.lesion_finder={tmp_path / 'nope.pt'}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.lesion_finder: file not found: {tmp_path / 'nope.pt'}" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
