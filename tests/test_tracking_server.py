"""Integration with a real MLflow tracking server (sqlite backend) on a loopback port; servers that fail
or stall; the process settings the tracking code makes (HTTP bounds, no telemetry)."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
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


class _FakeServer(http.server.BaseHTTPRequestHandler):
    """``/health`` answers 200; the REST API answers 503 (``server.mode == "503"``) or never (``"stall"``)."""

    def do_GET(self):
        if self.path.startswith("/health"):
            self._answer(200, b"OK")
        elif self.server.mode == "stall":  # type: ignore[attr-defined]
            self.server.release.wait(120)  # type: ignore[attr-defined]
        else:
            self._answer(503, b"Service Unavailable")

    do_POST = do_GET

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def fake_server():
    """``fake_server(mode)``: the URL of a local HTTP server whose MLflow API fails in that way."""
    servers = []

    def start(mode: str) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
        server.daemon_threads = True
        server.mode, server.release = mode, threading.Event()  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode, reason", [("503", "answered HTTP 503"), ("stall", "no answer")])
def test_a_server_whose_api_fails_or_stalls_stops_train_within_seconds(fake_server, tmp_path, capsys, mode, reason):
    """``/health`` says OK but the API does not work: train stops at the start check, in seconds, with one
    line naming the URL it asked (exit 1: a service failed)."""
    from lung_effnet.cli import main
    from lung_effnet.errors import TrackingError
    from lung_effnet.tracking import check_reachable

    url = fake_server(mode)
    with pytest.raises(TrackingError):  # imports MLflow's HTTP code before the clock starts
        check_reachable("http://127.0.0.1:9", timeout_s=1, retries=0)
    start = time.monotonic()
    code = main(["train", "-q", "--data", str(tmp_path), "--out", str(tmp_path / "out"), "--tracking-uri", url,
                 "--set", "tracking.timeout_s=1", "--set", "tracking.retries=1"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert code == 1 and elapsed < 20, (code, elapsed, err)
    assert f"GET {url}/api/2.0/mlflow/experiments/search?max_results=1" in err and reason in err and "\n" not in err
    assert not (tmp_path / "out" / "ingest").exists()


def test_mlflow_http_calls_are_bounded_by_the_config_unless_the_user_set_them(monkeypatch):
    from lung_effnet.tracking import configure_http

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's own setting
    configure_http(7, 1)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_importing_the_library_leaves_mlflow_http_settings_to_the_user():
    """A notebook that imports lung_effnet keeps MLflow's own timeouts for its own MLflow calls; only the
    ``lung-effnet`` command and a training run (``CVTracker``) bound them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    code = "import os, lung_effnet.tracking; print(os.environ.get('MLFLOW_HTTP_REQUEST_TIMEOUT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"


def test_mlflow_telemetry_is_off_in_the_package_s_processes(tmp_path, monkeypatch):
    """Importing the tracking code, and the CLI, set MLflow's and the common opt-out variables."""
    from lung_effnet.cli import main

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    code = "import os, lung_effnet.tracking; print(os.environ['MLFLOW_DISABLE_TELEMETRY'], os.environ['DO_NOT_TRACK'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["true", "true"], out.stderr[-2000:]
    for name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        monkeypatch.delenv(name, raising=False)
    main(["report", "--run", str(tmp_path), "--out", str(tmp_path / "o")])  # fails (no run): the variables are set first
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true" and os.environ["DO_NOT_TRACK"] == "true"
