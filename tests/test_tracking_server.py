"""Integration with a real MLflow tracking server (sqlite backend) on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import lung_effnet
from lung_effnet.config import load_config
from lung_effnet.synthetic.dataset import write_synthetic_dataset
from lung_effnet.training.cv import run_cv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 120 s")
    yield url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)
    log.close()


def test_training_tracks_to_a_real_server_and_the_model_loads_back(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("LUNG_EFFNET_CACHE_DIR", str(tmp_path / "cache"))
    data = write_synthetic_dataset(tmp_path / "data", "nifti", n_patients=6, seed=2, size_px=40, n_slices=3, progress=False)
    cfg = load_config(None, ["data.image_size=32", "data.context_slices=0", "train.epochs=1", "train.batch_size=8", "cv.folds=2",
                             "train.val_fraction=0.0", "data.slices=all", "tracking.experiment=server-test",
                             "tracking.register_model=lung-effnet-test", "tracking.alias=champion"])
    summary = run_cv(data, tmp_path / "run", cfg, labels_csv=data / "labels.csv", tracking_uri=mlflow_server, progress=False)

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    parent = summary["mlflow"]["parent_run_id"]
    assert len(runs) == 3 and sum(r.data.tags.get("mlflow.parentRunId") == parent for r in runs) == 2
    assert client.get_registered_model("lung-effnet-test").aliases["champion"]

    mlflow.set_tracking_uri(mlflow_server)
    from_registry = lung_effnet.load_model("models:/lung-effnet-test@champion")
    local = lung_effnet.load_model(tmp_path / "run")
    x = local.preprocess([np.linspace(-1000, 300, 1024, dtype=np.float32).reshape(32, 32)])
    np.testing.assert_allclose(from_registry.predict_proba(x), local.predict_proba(x), atol=1e-6)
