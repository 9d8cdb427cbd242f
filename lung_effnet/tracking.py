"""MLflow tracking: one parent run per cross-validation, one nested run per fold. Every MLflow call of
the package is in this module: runs, parameters, metrics, artifacts, the logged fold ensemble (and its
registry alias), loading a logged model back and fetching a finished run's files.

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
from typing import TYPE_CHECKING

from lung_effnet.errors import MissingInputError, TrackingError

if TYPE_CHECKING:  # annotations only: importing them here would load torch for every tracking user
    import torch
    from torch import nn

    from lung_effnet.models.predictor import Predictor

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_BATCH = 900  # MLflow accepts up to 1000 metrics per log_batch call


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
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        check_reachable(uri)
        self.uri = uri
        mlflow.set_tracking_uri(uri)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=local_artifact_location(uri))
        except (MlflowException, OSError, SQLAlchemyError) as exc:  # a store that cannot be opened: one line
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

    def log_model(self, run_id: str, predictor: Predictor, model_dir: Path, example: torch.Tensor,
                  register_as: str | None = None, alias: str | None = None) -> str:
        """``log_model_to_mlflow`` into run ``run_id`` (the parent run); returns the model URI."""
        import mlflow

        with mlflow.start_run(run_id=run_id):
            return log_model_to_mlflow(predictor, model_dir, example, register_as, alias)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def log_model_to_mlflow(predictor: Predictor, model_dir: Path, example: torch.Tensor, register_as: str | None = None,
                        alias: str | None = None) -> str:
    """Log the ensemble (with signature and input example) to the active MLflow run; optionally
    register it and point ``alias`` at the new version. Returns the model URI."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature

    example_np = example.float().numpy()
    output = predictor.predict_proba(example)
    signature = infer_signature(example_np, output.astype(np.float32))
    info = mlflow.pytorch.log_model(
        predictor.model.cpu(), name="model", signature=signature, input_example=example_np,
        extra_files=[str(model_dir / "config.yaml"), str(model_dir / "model.json")],
        registered_model_name=register_as, pip_requirements=["torch", "monai", "lung-effnet"],
        # pickle keeps the nn.Module (any batch size; Grad-CAM needs its layers); MLflow's pt2
        # export would fix the batch size of the input example.
        serialization_format="pickle",
    )
    if register_as and alias:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(register_as, alias, str(info.registered_model_version))
    return info.model_uri


LEGACY_MODULES = {
    "lung_effnet.predictor": "lung_effnet.models.predictor",
    "lung_effnet.model": "lung_effnet.models.factory",
    "lung_effnet.inference": "lung_effnet.models.bn_fold",
}
"""Where the classes of models logged before the package was laid out by stage (0.1.0) live now: the
pickled ensemble names its classes by module path."""


def _fetch_error(what: str, uri: str, exc: Exception) -> Exception:
    """One-line error for a failed MLflow fetch: the service when it could not be reached, else the input."""
    text = f"{what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if str(exc) else what
    unreachable = isinstance(exc, OSError) or any(w in str(exc) for w in ("Max retries", "Connection refused", "timed out"))
    return TrackingError(f"{text}; is the tracking server at {uri} up?") if unreachable else MissingInputError(text)


def load_logged_model(uri: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The module and the ``config.yaml`` content (a dict) of a model logged by ``log_model_to_mlflow``,
    from an MLflow model URI (``models:/name@alias``, ``runs:/<id>/model``, or a store URL)."""
    import importlib
    import sys

    import mlflow.artifacts
    import mlflow.pytorch
    import yaml
    from mlflow.exceptions import MlflowException

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except (MlflowException, OSError) as exc:  # unknown model, alias or run; an unreachable server
        raise _fetch_error(f"{uri}: cannot fetch the MLflow model", resolve_tracking_uri(), exc) from None
    config_files = list(local.rglob("config.yaml"))
    if not config_files:
        raise MissingInputError(f"{uri}: the MLflow model has no config.yaml (not logged by lung-effnet train)")
    config = yaml.safe_load(config_files[0].read_text())
    for old, new in LEGACY_MODULES.items():  # so an ensemble logged by 0.1.0 unpickles
        sys.modules.setdefault(old, importlib.import_module(new))
    return mlflow.pytorch.load_model(str(local), map_location=device), config


def latest_train_run_id(tracking_uri: str | None = None) -> str:
    """The most recent finished ``train`` parent run (has a ``data_fingerprint`` tag, no parent) in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=200) if experiments else []
    for run in runs:
        tags = run.data.tags
        if "mlflow.parentRunId" not in tags and "data_fingerprint" in tags:
            return run.info.run_id
    raise MissingInputError(f"no finished lung-effnet train run in the MLflow store {resolve_tracking_uri(tracking_uri)}")


def download_run_files(run_id: str, names: tuple[str, ...], folder: Path, tracking_uri: str | None = None) -> str:
    """Copy the artifacts ``names`` (paths inside the run) of run ``run_id`` to ``folder / name``;
    returns the tracking URI used. Raises ``MissingInputError`` for an unknown run or artifact,
    ``TrackingError`` when the server cannot be reached (one line each)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        for name in names:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=uri))
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(local.read_bytes())  # one layout whatever the store's download does
    except (MlflowException, OSError) as exc:  # unknown run, missing artifact; an unreachable server
        raise _fetch_error(f"MLflow run {run_id} in {uri}: cannot fetch its train outputs", uri, exc) from None
    return uri
