"""MLflow tracking: one parent run per cross-validation, one nested run per fold.

Runs are addressed by id through ``MlflowClient`` (not the fluent "active run" stack), so a
resumed training continues the same parent and fold runs. Metrics go in batches (``log_batch``),
never one HTTP call per number. Nothing identifying a patient is logged: parameters are the
config, tags are code version, data fingerprint and warnings.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_BATCH = 900  # MLflow accepts up to 1000 metrics per log_batch call


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; the message is one line."""


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """``--tracking-uri``, else the config's, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
    in the working directory (MLflow's own default since 3.7; the ./mlruns file store is deprecated)."""
    return cli_uri or config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise TrackingError(f"MLflow server at {uri} answered HTTP {response.status} on /health")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow server at {uri} is not reachable ({reason}); start it or pass --tracking-uri") from None


def local_artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go to ``mlartifacts/`` beside the database file (MLflow's own
    default is ./mlruns relative to wherever the process happens to run); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()


class CVTracker:
    """A parent run for the CV experiment and nested fold runs, resumable from ``state_file``."""

    def __init__(self, uri: str, experiment: str, state_file: Path):
        import mlflow
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=local_artifact_location(uri))
        except Exception as exc:  # a store that cannot be opened: say which, in one line
            raise TrackingError(f"cannot use MLflow store {uri}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        self.state_file = Path(state_file)
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=2))

    def parent(self, run_name: str, params: dict, tags: dict) -> str:
        """The parent run id (created once; a resumed training gets the same run back)."""
        run_id = self.state.get("parent_run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.state["parent_run_id"] = run_id
        self._save_state()
        return run_id

    def fold(self, fold: int, params: dict | None = None) -> str:
        """The nested run of one fold (tag ``mlflow.parentRunId``)."""
        key = f"fold_{fold}_run_id"
        if key in self.state:
            self.client.update_run(self.state[key], status="RUNNING")
            return self.state[key]
        parent = self.state["parent_run_id"]
        run = self.client.create_run(self.experiment_id, run_name=f"fold-{fold}",
                                     tags={"mlflow.parentRunId": parent, "fold": str(fold)})
        self.state[key] = run.info.run_id
        self._save_state()
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        """One batched call for a dict of metrics (NaN and non-numbers are left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v and abs(float(v)) != float("inf")]
        for start in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[start:start + MAX_BATCH])

    def log_artifacts(self, run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if Path(path).is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            elif Path(path).exists():
                self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
