"""Both review notebooks run top to bottom (nbclient) on the shared tiny run, in a temp copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def tiny(saliency_run):
    return saliency_run


def _execute(name: str, workdir: Path, env: dict, monkeypatch) -> list[str]:
    import nbclient
    import nbformat

    copy = workdir / name
    shutil.copy(NOTEBOOKS / name, copy)
    notebook = nbformat.read(copy, as_version=4)
    assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{name} is saved with outputs"
    assert "/work/" not in copy.read_text() and "/tmp/" not in copy.read_text()  # no absolute paths
    for key, value in env.items():  # the kernel inherits this process's environment
        monkeypatch.setenv(key, value)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}}).execute()
    return [o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for c in notebook.cells
            if c.cell_type == "code" for o in c.outputs]


def test_review_saliency_runs_on_the_latest_run_in_the_store(tiny, tmp_path, monkeypatch):
    outputs = _execute("review_saliency.ipynb", tmp_path, {
        "MLFLOW_TRACKING_URI": tiny["uri"], "LUNG_EFFNET_CACHE_DIR": str(tiny["cache"]), "LUNG_EFFNET_RUN": "",
        "TQDM_DISABLE": "1"}, monkeypatch)
    text = "\n".join(outputs)
    assert tiny["summary"]["mlflow"]["parent_run_id"] in text          # "latest" found this run through MLflow
    assert "Spearman rho(Grad-CAM, Grad-CAM++)" in text and "pointing_hit_rate" in text


def test_cv_results_runs_on_a_run_folder(tiny, tmp_path, monkeypatch):
    outputs = _execute("cv_results.ipynb", tmp_path, {
        "LUNG_EFFNET_RUN": str(tiny["run"]), "LUNG_EFFNET_CACHE_DIR": str(tiny["cache"]), "TQDM_DISABLE": "1"}, monkeypatch)
    text = "\n".join(outputs)
    assert "pooled OOF" in text and "Figure" in text
