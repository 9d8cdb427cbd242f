"""MLflow tracking: one parent run per cross-validation, one nested run per fold. Every MLflow call of
the package is in this module: runs, parameters, metrics, artifacts, the logged fold ensemble (and its
registry alias), loading a logged model back and fetching a finished run's files.

Runs are addressed by id through ``MlflowClient`` (not the fluent "active run" stack), so a
resumed training continues the same parent and fold runs. Metrics go in batches (``log_batch``),
never one HTTP call per number. No DICOM patient tag is logged: parameters are the config, tags are
code version, data fingerprint and warnings; the logged model holds state dicts, its config and no
input example. The run's artifacts do hold what ``report --run`` needs: the manifest and out-of-fold
predictions (paths, UIDs, pseudonymous patient ids) and the saliency report (training slices), so a
store holds patient images like the train output folder does (README, "Privacy").

Importing this module turns MLflow's usage telemetry off for the process (``MLFLOW_DISABLE_TELEMETRY``,
``DO_NOT_TRACK``). MLflow's HTTP calls are bounded (``configure_http``) by the ``lung-effnet`` command for
its whole process and by ``CVTracker`` for a run: a notebook's own MLflow calls keep MLflow's defaults
until it trains. A user's own setting of these variables wins.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from lung_effnet.config import TrackingConfig
from lung_effnet.errors import InputError, MissingInputError, TrackingError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_BATCH = 900  # MLflow accepts up to 1000 metrics per log_batch call
T = TypeVar("T")

NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
"""MLflow 3 sends usage telemetry unless one of these is set (``mlflow.telemetry.utils``)."""


def disable_telemetry() -> None:
    """Turn MLflow's usage telemetry off in this process and the processes it starts (a value the user
    set wins). Runs when this module is imported, before anything imports mlflow; the CLI calls it first."""
    for name, value in NO_TELEMETRY.items():
        os.environ.setdefault(name, value)


disable_telemetry()

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
_HTTP_SET_HERE: dict[str, str] = {}


def configure_http(timeout_s: int, retries: int) -> None:
    """Bound every MLflow HTTP call of this process: ``timeout_s`` seconds per try, ``retries`` retries
    (``tracking.timeout_s``, ``tracking.retries``). MLflow's own defaults, 120 s and 7 retries with
    backoff, let a server that stalls or answers 503 hold a run for many minutes. A value the user set
    in ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` wins."""
    for name, value in zip(HTTP_ENV, (timeout_s, retries)):
        if name not in os.environ or os.environ[name] == _HTTP_SET_HERE.get(name):
            os.environ[name] = _HTTP_SET_HERE[name] = str(int(value))



def absolute_uri(uri: str) -> str:
    """``uri`` with a relative sqlite path made absolute (against the working directory now), so the
    store can be found again from another directory; any other URI as it is."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path, sep, query = uri[len(prefix):].partition("?")
    if not path or path == ":memory:" or Path(path).is_absolute():
        return uri
    return f"{prefix}{Path(path).resolve()}{sep}{query}"


def resolve_tracking_uri(cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """``--tracking-uri``, else the config's, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``
    in the working directory (MLflow's own default since 3.7; the ./mlruns file store is deprecated).
    A relative sqlite path comes back absolute (``absolute_uri``)."""
    return absolute_uri(cli_uri or config_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def run_tracking_uri(state_file: Path, cli_uri: str | None = None, config_uri: str | None = None) -> str:
    """The tracking URI for a run whose ``CVTracker`` state is ``state_file``: the one it recorded when
    it started (so ``--resume`` from any working directory, or with another ``MLFLOW_TRACKING_URI``,
    continues in the same store), else ``resolve_tracking_uri``.

    Raises:
        InputError: ``cli_uri`` / ``config_uri`` names another store than the run's.
    """
    state = json.loads(Path(state_file).read_text()) if Path(state_file).is_file() else {}
    recorded = state.get("tracking_uri")
    if not recorded:
        return resolve_tracking_uri(cli_uri, config_uri)
    asked = cli_uri or config_uri
    if asked and absolute_uri(asked) != recorded:
        raise InputError(f"{Path(state_file).parent} is tracked in {recorded}, not {asked}: resume it without "
                         f"--tracking-uri / tracking.tracking_uri (or fix tracking_uri in {state_file})")
    return recorded


API_PROBE = "/api/2.0/mlflow/experiments/search"
"""What ``check_reachable`` asks: a cheap call of the REST API the run will use (``/health`` answers
even when the API behind it fails)."""


def check_reachable(uri: str, timeout_s: int = TrackingConfig.timeout_s, retries: int = TrackingConfig.retries) -> None:
    """Fail fast, with one line naming the URL, when an HTTP tracking server does not answer its API:
    ``GET <uri>/api/2.0/mlflow/experiments/search?max_results=1``, ``timeout_s`` seconds per try,
    ``retries`` retries (1 s, 2 s ... apart); a 5xx, a stall, a refused connection or an answer that is
    not MLflow's JSON raise ``TrackingError``. Local stores (sqlite, files) are not checked here."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    url = f"{uri.rstrip('/')}{API_PROBE}?max_results=1"
    tries = f"{retries + 1} tr{'y' if retries == 0 else 'ies'} of {timeout_s} s"
    try:  # MLflow's own request: its credentials (MLFLOW_TRACKING_TOKEN, ...) and TLS settings apply
        response = http_request(get_default_host_creds(uri.rstrip("/")), API_PROBE, "GET", max_retries=retries,
                                backoff_factor=1, backoff_jitter=0.0, timeout=timeout_s, raise_on_status=False,
                                params={"max_results": 1})
    except MlflowException as exc:
        text = str(exc).lower()
        reason = next((why for words, why in ((("refused",), "connection refused"),
                                              (("resolve", "name or service not known", "nodename nor servname"), "unknown host"),
                                              (("timed out", "timeout"), "no answer"),
                                              (("ssl", "certificate"), "TLS error")) if any(w in text for w in words)),
                      str(exc).splitlines()[0][:200])
        raise TrackingError(f"MLflow server at {uri} is not reachable: GET {url}: {reason} ({tries}); start it, "
                            "or pass --tracking-uri") from None
    if response.status_code != 200:
        raise TrackingError(f"MLflow server at {uri} cannot be used: GET {url} answered HTTP {response.status_code} "
                            f"({tries})")
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise TrackingError(f"{uri} is not an MLflow tracking server: GET {url} did not answer with MLflow's JSON")


def local_artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go to ``mlartifacts/`` beside the database file (MLflow's own
    default is ./mlruns relative to wherever the process happens to run); servers choose their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()


class CVTracker:
    """A parent run for the CV experiment and nested fold runs, resumable from ``state_file`` (which
    records the run ids and the tracking URI: see ``run_tracking_uri``).

    ``timeout_s`` / ``retries`` bound every MLflow HTTP call (``configure_http``) and the start-up check.
    Runs left open when the work fails are ended by ``ending_runs_on_error``."""

    def __init__(self, uri: str, experiment: str, state_file: Path, timeout_s: int = TrackingConfig.timeout_s,
                 retries: int = TrackingConfig.retries):
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        configure_http(timeout_s, retries)
        uri = absolute_uri(uri)
        check_reachable(uri, timeout_s, retries)
        self.uri = uri
        self.open_runs: list[str] = []  # started or resumed here, not yet ended
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
        """Merge this process's run ids into ``state_file``, under its lock: fold jobs of one run
        (``train --fold i``) each add their own fold's id to the same file."""
        from lung_effnet.io.shared_files import exclusive, write_atomic

        with exclusive(self.state_file.with_name(f".{self.state_file.name}.lock"), "recording MLflow run ids"):
            current = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
            self.state = {**current, **self.state, "tracking_uri": self.uri}
            write_atomic(self.state_file, json.dumps(self.state, indent=2))

    def parent(self, run_name: str, params: dict, tags: dict, hold: bool = True) -> str:
        """The parent run id (created once; a resumed training, or a fold job of the run, gets the same
        run back, by the id recorded in ``state_file``). ``hold``: this process runs the parent (sets it
        running, ends it on failure); a fold job only attaches its fold run to it."""
        run_id = self.state.get("parent_run_id")
        if run_id:
            if hold:
                self.client.update_run(run_id, status="RUNNING")
                self.open_runs.append(run_id)
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        run_id = run.info.run_id
        if hold:
            self.open_runs.append(run_id)
        self.log_params(run_id, params)
        self.state["parent_run_id"] = run_id
        self._save_state()
        return run_id

    def fold(self, fold: int, params: dict | None = None) -> str:
        """The nested run of one fold (tag ``mlflow.parentRunId``)."""
        key = f"fold_{fold}_run_id"
        if key in self.state:
            self.client.update_run(self.state[key], status="RUNNING")
            self.open_runs.append(self.state[key])
            return self.state[key]
        parent = self.state["parent_run_id"]
        run = self.client.create_run(self.experiment_id, run_name=f"fold-{fold}",
                                     tags={"mlflow.parentRunId": parent, "fold": str(fold)})
        self.open_runs.append(run.info.run_id)
        self.state[key] = run.info.run_id
        self._save_state()
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

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

    def log_model(self, run_id: str, model_dir: Path, register_as: str | None = None, alias: str | None = None) -> str:
        """``log_model_dir`` into run ``run_id`` (the parent run); returns the model URI."""
        import mlflow

        with mlflow.start_run(run_id=run_id):
            return log_model_dir(model_dir, register_as, alias)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        if run_id in self.open_runs:
            self.open_runs.remove(run_id)

    @contextlib.contextmanager
    def ending_runs_on_error(self) -> Iterator[None]:
        """Around the work of a run: if it raises, the runs still open (the parent, the fold in progress)
        are ended ``FAILED`` (``KILLED`` for Ctrl-C and other non-``Exception`` exits) instead of being left
        ``RUNNING``, then the exception goes on. ``--resume`` sets them running again."""
        try:
            yield
        except BaseException as exc:
            status = "FAILED" if isinstance(exc, Exception) else "KILLED"
            for run_id in reversed(self.open_runs):
                try:
                    self.client.set_terminated(run_id, status=status)
                except Exception as end_exc:  # the store itself may be what failed: the first error is the one to see
                    log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(end_exc).splitlines()[0][:200])
                    break
            self.open_runs.clear()
            raise


PYFUNC_LOADER = "lung_effnet.models.mlflow_pyfunc"
"""The module MLflow's own tools import (from the installed package) to load a logged ensemble."""
MODEL_NAME = "model"


def log_model_dir(model_dir: Path, register_as: str | None = None, alias: str | None = None) -> str:
    """Log a model folder (``fold_<k>.pt`` state dicts, ``config.yaml``, ``model.json``) to the active run as
    the MLflow model ``model``; optionally register it and point ``alias`` at the new version. Returns the
    model URI (``models:/<model id>``).

    The folder is logged as it is, as the data of a ``python_function`` model whose loader module is
    ``lung_effnet.models.mlflow_pyfunc`` (so ``mlflow.pyfunc.load_model`` works too): nothing is pickled,
    and loading rebuilds the network from code and reads the state dicts with ``weights_only=True``
    (``load_logged_model``). The signature gives the input and output shapes; no input example is stored
    (it would be a patient's image, in a registry that may be shared)."""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *meta["input_shape"]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["classes"])))]))
    with warnings.catch_warnings():  # MLflow asks for an input example: leaving it out is the point
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = mlflow.pyfunc.log_model(name=MODEL_NAME, loader_module=PYFUNC_LOADER, data_path=str(model_dir),
                                       signature=signature, registered_model_name=register_as,
                                       pip_requirements=["torch", "monai", "lung-effnet"])
    if register_as and alias:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(register_as, alias, str(info.registered_model_version))
    return info.model_uri


def _fetch_error(what: str, uri: str, exc: Exception) -> Exception:
    """One-line error for a failed MLflow fetch: the service when it could not be reached, else the input."""
    text = f"{what} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})" if str(exc) else what
    unreachable = isinstance(exc, OSError) or any(w in str(exc) for w in ("Max retries", "Connection refused", "timed out"))
    return TrackingError(f"{text}; is the tracking server at {uri} up?") if unreachable else MissingInputError(text)


def load_logged_model(uri: str, load_folder: Callable[[Path], T]) -> T:
    """``load_folder(<model folder>)`` for the MLflow model ``uri`` (``models:/name@alias``,
    ``runs:/<id>/model``, ``models:/<model id>``) logged by ``log_model_dir``: the model is downloaded into a
    temporary folder, removed once ``load_folder`` has returned.

    Nothing from the store is unpickled or imported here: the folder's files are handed to ``load_folder``
    (``models.predictor.load_model_dir``: state dicts with ``weights_only=True``, YAML, JSON).

    Raises:
        MissingInputError: no such model, alias or run; not a lung-effnet model; a model logged by
            lung-effnet 0.1 (a pickled module, which runs code when loaded: it is not read).
        TrackingError: the tracking server cannot be reached.
    """
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="lung-effnet-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError) as exc:  # unknown model, alias or run; an unreachable server
            raise _fetch_error(f"{uri}: cannot fetch the MLflow model", resolve_tracking_uri(), exc) from None
        mlmodel = local / "MLmodel"
        try:
            meta = yaml.safe_load(mlmodel.read_text()) if mlmodel.is_file() else None
        except yaml.YAMLError:
            meta = None
        flavors = meta.get("flavors") if isinstance(meta, dict) else None
        if not isinstance(flavors, dict):
            raise MissingInputError(f"{uri}: not an MLflow model (no readable MLmodel file)")
        pyfunc = flavors.get("python_function") or {}
        if pyfunc.get("loader_module") == PYFUNC_LOADER and isinstance(pyfunc.get("data"), str):
            folder = (local / pyfunc["data"]).resolve()
            if local.resolve() in folder.parents and folder.is_dir():
                return load_folder(folder)
            raise MissingInputError(f"{uri}: the MLflow model has no model folder at {pyfunc['data']!r}")
        if "pytorch" in flavors:
            raise MissingInputError(f"{uri}: this model was logged by lung-effnet 0.1 as a pickled PyTorch module, an "
                                    "unsafe format (loading it runs code) that is no longer read; use the train output "
                                    "folder instead (score --model <out>/model, report --run <out>), or retrain")
        raise MissingInputError(f"{uri}: not a lung-effnet model (MLflow flavors: {', '.join(flavors) or 'none'})")


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
            with tempfile.TemporaryDirectory(prefix="lung-effnet-download-") as tmp:  # not MLflow's own temp folders
                local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp,
                                                                 tracking_uri=uri))
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(local.read_bytes())  # one layout whatever the store's download does
    except (MlflowException, OSError) as exc:  # unknown run, missing artifact; an unreachable server
        raise _fetch_error(f"MLflow run {run_id} in {uri}: cannot fetch its train outputs", uri, exc) from None
    return uri
