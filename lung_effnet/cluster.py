"""Jobs on a SLURM cluster or on this machine, through submitit: an array of jobs, then one job
that depends on all of them. Stage-independent: ``score --executor`` (shards, then the merge)
uses it, and any stage with the same shape (``train``'s folds, then the merge) can.

    from functools import partial
    from lung_effnet.cluster import ClusterOptions, submit_jobs

    plan = submit_jobs([partial(work, k) for k in range(n)], "slurm", out / "jobs",
                       ClusterOptions(partition="gpu", gpus_per_job=1, timeout_min=120),
                       then=partial(merge, out))
    print(plan.array_ids, plan.then_id)

Each job is a picklable callable without arguments (a module-level function in a
``functools.partial``; submitit pickles it into ``folder``, where the job's stdout, stderr and
result land too). ``executor``:

- ``"slurm"``: one ``sbatch`` job array (``submitit.AutoExecutor(cluster="slurm")``,
  ``submit_array``), and ``then`` submitted at once with ``--dependency=afterok:<array id>``
  (``slurm_additional_parameters``) and ``--kill-on-invalid-dep=yes``, so that a failed job
  cancels it rather than leaving it pending. Returns without waiting: ``folder`` and everything
  the jobs read and write must be on a file system every node sees.
- ``"local"``: the same jobs as processes on this machine (``submitit.LocalExecutor``, all at
  once), waited for; then ``then`` runs the same way. Each job gets ``cores / jobs`` torch
  threads (``ClusterOptions.threads`` overrides), so concurrent jobs do not oversubscribe the
  cores. A failed job raises ``JobError`` naming it and its log.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lung_effnet.errors import JobError, UsageError

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class ClusterOptions:
    """Resources of each job: SLURM ``partition`` (``None``: the cluster's default), GPUs and
    CPUs per job (``None``: the cluster's default), time limit in minutes, job ``name``, and torch
    ``threads`` per job (``None``: SLURM: the job's default; local: the cores shared out)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    timeout_min: int = 60
    name: str = "lung-effnet"
    threads: int | None = None


@dataclass
class Submitted:
    """What ``submit_jobs`` started: the submitit jobs, their ids, and (local only) their results."""

    executor: str
    array: list = field(default_factory=list)
    then: Any = None
    results: list = field(default_factory=list)
    then_result: Any = None

    @property
    def array_ids(self) -> list[str]:
        return [job.job_id for job in self.array]

    @property
    def then_id(self) -> str | None:
        return None if self.then is None else self.then.job_id


def submit_jobs(calls: Sequence[Callable[[], Any]], executor: str, folder: str | Path,
                options: ClusterOptions | None = None, then: Callable[[], Any] | None = None) -> Submitted:
    """Run ``calls`` as an array of jobs and ``then`` after all of them succeed (module docstring).

    Raises:
        UsageError: an unknown ``executor``, or ``"slurm"`` where there is no SLURM (no ``srun``).
        JobError: (local) a job failed; ``then`` is not run.
    """
    options = options or ClusterOptions()
    if executor not in EXECUTORS:
        raise UsageError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "slurm" and shutil.which("srun") is None:
        raise UsageError("--executor slurm: no SLURM here (srun not found on PATH); run on a login node, or use --executor local")
    threads = options.threads
    if threads is None and executor == "local":
        threads = max(1, (os.cpu_count() or 1) // max(1, len(calls)))
    ex = _executor(executor, Path(folder), options)
    wrapped = [functools.partial(call_with_threads, call, threads) for call in calls]
    plan = Submitted(executor, list(ex.submit_array(wrapped)) if wrapped else [])
    if executor == "slurm":
        if then is not None:
            if plan.array:  # tasks are <array id>_<k>: afterok on the array id waits for every task
                ex.update_parameters(slurm_additional_parameters={
                    "dependency": f"afterok:{plan.array[0].job_id.split('_')[0]}", "kill_on_invalid_dep": "yes"})
            plan.then = ex.submit(call_with_threads, then, threads)
        return plan
    plan.results = [wait_for(job, f"job {k + 1} of {len(plan.array)}") for k, job in enumerate(plan.array)]
    if then is not None:
        plan.then = ex.submit(call_with_threads, then, options.threads or os.cpu_count())
        plan.then_result = wait_for(plan.then, "the final job")
    return plan


def _executor(executor: str, folder: Path, options: ClusterOptions):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster=executor)
    ex.update_parameters(name=options.name, timeout_min=options.timeout_min, gpus_per_node=options.gpus_per_job,
                         nodes=1, tasks_per_node=1,
                         **({"cpus_per_task": options.cpus_per_job} if options.cpus_per_job else {}),
                         **({"slurm_partition": options.partition} if options.partition else {}))
    return ex


def call_with_threads(call: Callable[[], Any], threads: int | None) -> Any:
    """Run ``call()`` with ``threads`` torch threads (``None``: as the job starts); the job body."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    return call()


def wait_for(job, what: str) -> Any:
    """The job's result; its failure becomes one ``JobError`` line naming ``what``, the job and its log."""
    try:
        return job.result()
    except Exception as exc:  # submitit re-raises the job's error as FailedJobError / UncompletedJobError
        last = next((line for line in reversed(str(exc).splitlines()) if line.strip()), type(exc).__name__)
        raise JobError(f"{what} failed (job {job.job_id}): {last.strip()[:300]}; log: {job.paths.stderr}") from None
