"""Both review notebooks run top to bottom (nbclient) on the shared tiny run, in a temp copy laid out as a
user's checkout (``BASE/notebooks/<name>``, the run and store under ``BASE``), with the kernel in
``notebooks/`` and ``$PWD`` at ``BASE``, as when Jupyter is started from the repository root.

They show their plots as images, find a relative run folder or store from where Jupyter was started,
and never leave an MLflow store behind (MLflow creates an empty database wherever it is pointed)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from lung_effnet.errors import MissingInputError
from lung_effnet.explain.trained_run import load_run, store_uri

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
RUN_VARIABLES = ("LUNG_EFFNET_RUN", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def tiny(saliency_run):
    return saliency_run


@pytest.fixture
def no_new_stores():
    """Fails the test if an ``mlflow.db`` appeared in the repository's notebooks folder or the working directory."""
    watched = {p: p.exists() for p in (NOTEBOOKS / "mlflow.db", Path.cwd() / "mlflow.db")}
    yield
    for p, existed in watched.items():
        assert p.exists() == existed, f"{p} created"


def _checkout(base: Path, tiny: dict, store: bool = False) -> Path:
    """``base/demo_output/train`` (the run) and, with ``store``, ``base/mlflow.db`` (the run's store), as links."""
    (base / "demo_output").mkdir(parents=True)
    (base / "demo_output" / "train").symlink_to(tiny["run"], target_is_directory=True)
    if store:
        (base / "mlflow.db").symlink_to(tiny["uri"][len("sqlite:///"):])
    return base


def _execute(name: str, base: Path, env: dict, monkeypatch) -> list[dict]:
    """Run ``base/notebooks/name`` with the kernel in ``base/notebooks`` and ``$PWD`` at ``base``; ``env``
    on top of this process's environment (``None``: unset). Returns every output of every code cell."""
    import nbclient
    import nbformat

    (base / "notebooks").mkdir(exist_ok=True)
    copy = base / "notebooks" / name
    shutil.copy(NOTEBOOKS / name, copy)
    notebook = nbformat.read(copy, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{name} is saved with outputs"
    assert "/work/" not in copy.read_text() and "/tmp/" not in copy.read_text()  # no absolute paths
    for key in RUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"PWD": str(base), "TQDM_DISABLE": "1", **env}.items():  # the kernel inherits this environment
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(base / "notebooks")}}).execute()
    assert [p for p in base.rglob("mlflow.db*") if not p.is_symlink()] == []  # no store created (the link is the test's)
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]


def _text(outputs: list[dict]) -> str:
    return "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)


def test_cv_results_shows_its_plots_as_images_for_a_relative_run_folder(tiny, tmp_path, monkeypatch, no_new_stores):
    base = _checkout(tmp_path / "checkout", tiny)
    outputs = _execute("cv_results.ipynb", base, {"LUNG_EFFNET_RUN": "demo_output/train",
                                                  "LUNG_EFFNET_CACHE_DIR": str(tiny["cache"])}, monkeypatch)
    text = _text(outputs)
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3 and all(p.startswith(b"\x89PNG") and len(p) > 10_000 for p in pngs)  # ROC, confusion, reliability
    assert "<Figure" not in text  # a Figure shown as text is no plot
    assert "IProgress" not in text  # tqdm.auto's warning in a kernel without ipywidgets
    assert "pooled OOF" in text and str(base / "demo_output" / "train") in text  # found from $PWD, not notebooks/


def test_review_saliency_opens_a_run_id_in_a_relative_store(tiny, tmp_path, monkeypatch, no_new_stores):
    base = _checkout(tmp_path / "checkout", tiny, store=True)
    parent = tiny["summary"]["mlflow"]["parent_run_id"]
    outputs = _execute("review_saliency.ipynb", base, {
        "LUNG_EFFNET_RUN": parent, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
        "LUNG_EFFNET_CACHE_DIR": str(tiny["cache"])}, monkeypatch)
    text = _text(outputs)
    assert parent in text and "(read from MLflow)" in text and "IProgress" not in text
    assert "Spearman rho(Grad-CAM, Grad-CAM++)" in text and "pointing_hit_rate" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the cases figure (pyplot)


def test_without_variables_the_latest_run_of_the_store_where_jupyter_started_opens(tiny, tmp_path, monkeypatch,
                                                                                   no_new_stores):
    base = _checkout(tmp_path / "checkout", tiny, store=True)
    (base / "notebooks").mkdir()
    monkeypatch.chdir(base / "notebooks")  # as the kernel: in notebooks/, $PWD at the checkout
    monkeypatch.setenv("PWD", str(base))
    for key in RUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    assert store_uri() == f"sqlite:///{Path(tiny['uri'][len('sqlite:///'):]).resolve()}"
    run = load_run()
    assert run.parent_run_id == tiny["summary"]["mlflow"]["parent_run_id"] and run.folder is None
    assert not (base / "notebooks" / "mlflow.db").exists()


def test_a_missing_store_or_folder_is_a_clear_error_and_nothing_is_created(tmp_path, monkeypatch, no_new_stores):
    kernel, started = tmp_path / "repo" / "notebooks", tmp_path / "repo"
    kernel.mkdir(parents=True)
    monkeypatch.chdir(kernel)
    monkeypatch.setenv("PWD", str(started))
    for key in RUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(MissingInputError, match="no MLflow store at sqlite:///mlflow.db") as err:
        load_run()  # no variable, no mlflow.db anywhere: the old code made notebooks/mlflow.db here
    assert str(kernel / "mlflow.db") in str(err.value) and str(started / "mlflow.db") in str(err.value)
    missing = tmp_path / "elsewhere" / "store.db"
    with pytest.raises(MissingInputError, match="nothing was created"):
        load_run("0123456789abcdef0123456789abcdef", f"sqlite:///{missing}")
    with pytest.raises(MissingInputError, match="no such folder") as err:
        load_run("demo_output/train")  # a path that exists nowhere is not taken as a run id
    assert str(started / "demo_output" / "train") in str(err.value)
    with pytest.raises(MissingInputError, match="not an MLflow run id"):
        load_run("demo_output")
    assert list(tmp_path.rglob("*.db")) == [] and not missing.parent.exists()
