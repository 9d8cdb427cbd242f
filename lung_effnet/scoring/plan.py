"""``score --executor slurm|local --shards N``: N shard jobs (``score --shard i/N``) as one job array
and a merge job that waits for them (``lung_effnet.cluster``).

Layout under ``--out``: ``shards/shard_<i>_of_<N>/`` (each shard's own outputs and resume
records), ``shards/jobs/`` (submitit's pickles and the jobs' logs), and the merged outputs in
``--out`` itself (``merge``). Submitting the same command again resumes: each shard job skips the
series its folder already holds. ``--out`` must not lie inside ``--input`` here: a shard leaves
only its own folder out of its walk, and would read the other shards' outputs as inputs.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from lung_effnet.cluster import ClusterOptions, submit_jobs
from lung_effnet.errors import UsageError
from lung_effnet.models.predictor import is_model_uri
from lung_effnet.scoring.merge import merge_scores
from lung_effnet.scoring.runner import score_archive
from lung_effnet.scoring.shards import Shard


def shard_dirs(out_dir: Path, count: int) -> list[Path]:
    """The shard folders of a ``count``-way split under ``out_dir``, shard 0 first."""
    return [Path(out_dir) / "shards" / Shard(i, count).folder_name for i in range(count)]


def submit_sharded_score(model: str | Path, input_dir: str | Path, out_dir: str | Path, shards: int, executor: str,
                         options: ClusterOptions | None = None, **score_options) -> dict:
    """Submit the plan (module docstring). ``score_options``: ``score_archive``'s keyword options
    (``batch_size``, ``device``, ``workers``, ``saliency``, ``pseudonymize_uids``, ``dicom_out``).

    Returns ``{"executor", "shard_jobs": [ids], "merge_job": id, "shard_dirs": [...]}`` and, with
    ``executor="local"`` (which waits), ``"summary"``: the merged ``summary.json``.
    """
    if shards < 1:
        raise UsageError(f"--shards: must be >= 1, got {shards}")
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    if input_dir.is_dir() and out_dir.is_relative_to(input_dir):
        raise UsageError(f"--out: {out_dir} lies inside --input {input_dir}: with --executor the shards would read "
                         "each other's outputs as input; give a folder outside --input")
    model = model if is_model_uri(str(model)) else str(Path(model).resolve())
    for key in ("pseudonymize_uids", "dicom_out"):
        if score_options.get(key) is not None:
            score_options[key] = str(Path(score_options[key]).resolve())
    folders = shard_dirs(out_dir, shards)
    jobs = [partial(score_archive, model, str(input_dir), str(folder), shard=Shard(i, shards), progress=False,
                    **score_options) for i, folder in enumerate(folders)]
    plan = submit_jobs(jobs, executor, out_dir / "shards" / "jobs", options or ClusterOptions(),
                       then=partial(merge_scores, [str(f) for f in folders], str(out_dir)))
    result = {"executor": executor, "shard_jobs": plan.array_ids, "merge_job": plan.then_id,
              "shard_dirs": [str(f) for f in folders]}
    if executor == "local":
        result["summary"] = plan.then_result
    return result
