"""``train --executor local|slurm``: the folds as cluster jobs (``cluster.submit_jobs``, submitit),
one job-array task per fold plus a merge job that depends on them.

The plan, whatever runs it:

1. here, before anything is submitted: the output folder's MLflow parent run (``cv.create_parent``),
   so every fold job attaches its nested run to it by id (``mlflow_run.json``), never through
   ``MLFLOW_RUN_ID`` or an active-run stack;
2. one array task per fold still to train (``run_cv(fold=k)``; with ``--resume``, finished folds
   are not submitted). The first task to take the folder's lock ingests, preprocesses and writes
   ``folds.csv``; the others wait for it and read the cache;
3. the merge (``run_cv(merge=True)``): out-of-fold predictions, plots, ``model/``, the saliency
   report and ``cv_summary.json``. On SLURM it is submitted at once with ``afterok`` on the array,
   and ``train`` returns the job ids; locally (``--executor local``, ``submitit.LocalExecutor``:
   processes on this machine) ``train`` waits for the folds, then runs the merge job and returns
   its summary.

The cache and ``--out`` must be on a file system every node sees (``README.md``, "On a cluster").
Job logs (stdout, stderr, the pickled results) go to ``OUT/jobs/``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from lung_effnet.cluster import ClusterOptions, submit_jobs
from lung_effnet.config import Config


def fold_job(source: str, out: str, cfg: Config, labels_csv: str | None, tracking_uri: str | None, fold: int) -> dict:
    """One array task: train fold ``fold`` of the run in ``out`` (``run_cv(fold=...)``)."""
    from lung_effnet.training.cv import run_cv

    return run_cv(source, out, cfg, labels_csv, tracking_uri, progress=False, fold=fold)


def merge_job(source: str, out: str, cfg: Config, labels_csv: str | None, tracking_uri: str | None) -> dict:
    """The last job: assemble the run from its finished folds (``run_cv(merge=True)``)."""
    from lung_effnet.training.cv import run_cv

    return run_cv(source, out, cfg, labels_csv, tracking_uri, progress=False, merge=True)


def submit_cv(source: str | Path, out: str | Path, cfg: Config, labels_csv: str | Path | None = None,
              tracking_uri: str | None = None, resume: bool = False, executor: str = "local",
              options: ClusterOptions | None = None) -> dict:
    """Run the plan (module docstring) through ``cluster.submit_jobs``. Returns ``{"executor",
    "parent_run_id", "fold_jobs": {fold: job id}, "merge_job": id, "summary": cv_summary (local only)}``.

    Raises:
        JobError: a local fold or merge job failed (the message names the job and its log).
        UsageError: ``slurm`` where there is no SLURM.
    """
    from lung_effnet.training.cv import check_inputs, create_parent, missing_folds

    out = Path(out).resolve()
    check_inputs(out, cfg, resume)
    parent_id = create_parent(source, out, cfg, tracking_uri)
    todo = missing_folds(out, cfg)
    args = (str(Path(source).resolve()), str(out), cfg, str(Path(labels_csv).resolve()) if labels_csv else None,
            tracking_uri)
    plan = submit_jobs([partial(fold_job, *args, k) for k in todo], executor, out / "jobs",
                       options or ClusterOptions(name=f"lung-effnet-{out.name}"), then=partial(merge_job, *args))
    result = {"executor": executor, "parent_run_id": parent_id, "fold_jobs": dict(zip(todo, plan.array_ids)),
              "merge_job": plan.then_id}
    if executor == "local":
        result["summary"] = plan.then_result
    return result
