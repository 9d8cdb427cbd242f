"""``lung-effnet merge-scores``: the N shard folders of ``score --shard i/N`` joined into the
outputs of one unsharded run.

Everything comes from what each finished shard left: ``parts/run.json`` (model fingerprint and
settings), ``parts/shard.json`` (its units, its header-pass ledger rows, the archive's inventory
digest; ``shards``), the per-unit records under ``parts/`` and ``summary.json`` (the model and run
details). The final files are written by ``outputs.write_outputs`` from those records, as an
unsharded run writes them from its own, so ``predictions.csv``, ``slice_scores.csv``,
``files.csv`` and ``errors.csv`` are byte for byte those of the unsharded run (2D images are
batched with other images of their own shard: their probabilities could differ by float
rounding, < 1e-6, below the CSVs' 6 decimals except at a rounding edge). ``reports/`` pages are
copied. In ``summary.json``, ``counts``, ``model``, ``aggregation``, ``uids`` and ``dicom_out`` equal
the unsharded run's; ``run`` adds up the shards' (``units_*``, ``slices_scored``, ``wall_s`` as the
sum of the shards' wall times; the rates follow from it; ``device``, ``workers``,
``batch_size``, ``decode`` and the version are the first shard's), and ``shards`` lists each
shard's folder and wall time.

Refused, with one line naming the folders: a folder that is not a finished shard, shards of
different splits (``N``), a shard given twice or missing, shards of different models or
settings, shards that saw different inputs, a series or file in two shards, a unit without its
record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lung_effnet.errors import InputError
from lung_effnet.io.ledger import Ledger
from lung_effnet.scoring.dicom_results import check_dicom_out_apart, dicom_summary
from lung_effnet.scoring.discover import Discovery
from lung_effnet.scoring.journal import read_record
from lung_effnet.scoring.outputs import write_outputs
from lung_effnet.scoring.shards import manifest_discovery, read_shard_manifest

SUMMED = ("units_resumed", "units_scored", "slices_scored")


def merge_scores(shard_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Join finished shard folders into ``out_dir`` (module docstring); returns the summary.

    Raises:
        InputError: the shards do not make one complete run (module docstring), one line.
    """
    out_dir = Path(out_dir)
    if any(out_dir.resolve() == Path(d).resolve() for d in shard_dirs):
        raise InputError(f"--out: {out_dir} is one of the shard folders; give another folder (e.g. their parent)")
    shards = []
    for folder in map(Path, shard_dirs):
        manifest = read_shard_manifest(folder)
        try:
            settings = json.loads((folder / "parts" / "run.json").read_text())
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{folder}: not a finished shard (parts/run.json or summary.json: {type(exc).__name__})") from None
        shards.append({"dir": folder, "manifest": manifest, "settings": settings, "summary": summary})
    if not shards:
        raise InputError("merge-scores: no shard folders given")
    _check_complete(shards)
    _check_same_run(shards)
    first = shards[0]["summary"]
    dicom_dir = (check_dicom_out_apart(first["dicom_out"]["dir"], **{"--out": out_dir})  # patient tags: never in the outputs
                 if "dicom_out" in first else None)
    discovery, records = _join(shards)
    _copy_reports(shards, records, out_dir)
    info = {k: v for k, v in first.items() if k not in ("counts", "run", "shard", "dicom_out", "uids")}
    info["run"] = _merged_run([s["summary"]["run"] for s in shards])
    if dicom_dir is not None:
        info["dicom_out"] = dicom_summary(records, dicom_dir)
    info["shards"] = [{"dir": str(s["dir"]), "wall_s": s["summary"]["run"]["wall_s"]} for s in shards]
    return write_outputs(out_dir, discovery, records, info, uid_summary={"uids": first["uids"]})


def _name(shard: dict) -> str:
    s = shard["manifest"]["shard"]
    return f"{shard['dir']} (shard {s['index']}/{s['count']})"


def _check_complete(shards: list[dict]) -> None:
    counts = {s["manifest"]["shard"]["count"] for s in shards}
    if len(counts) > 1:
        raise InputError(f"shards of different splits: {', '.join(_name(s) for s in shards)}")
    (count,) = counts
    seen: dict[int, dict] = {}
    for s in shards:
        index = s["manifest"]["shard"]["index"]
        if index in seen:
            raise InputError(f"shard {index}/{count} given twice: {seen[index]['dir']} and {s['dir']}")
        seen[index] = s
    missing = [f"{i}/{count}" for i in range(count) if i not in seen]
    if missing:
        raise InputError(f"incomplete shard set: shard {', '.join(missing)} missing (given: "
                         f"{', '.join(_name(s) for s in shards)})")
    shards.sort(key=lambda s: s["manifest"]["shard"]["index"])


def _check_same_run(shards: list[dict]) -> None:
    first = shards[0]
    base = {k: v for k, v in first["settings"].items() if k != "shard"}
    for s in shards[1:]:
        other = {k: v for k, v in s["settings"].items() if k != "shard"}
        if other.get("model") != base.get("model"):
            raise InputError(f"shards scored with different models: {_name(first)} model {str(base.get('model'))[:12]}, "
                             f"{_name(s)} model {str(other.get('model'))[:12]}")
        if other != base:
            changed = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise InputError(f"shards scored with different settings ({', '.join(changed)}): {_name(first)} and {_name(s)}")
        if s["manifest"]["inventory"] != first["manifest"]["inventory"]:
            raise InputError(f"shards saw different inputs (the archive changed between them?): {_name(first)} and "
                             f"{_name(s)}; score the shards again")


def _join(shards: list[dict]) -> tuple[Discovery, list[dict]]:
    """The whole run's discovery (header-pass ledger rows of all shards) and all records, checking
    that each series and each file is in exactly one shard."""
    rows: dict[str, dict] = {}
    stages: dict[str, str] = {}
    owner: dict[str, dict] = {}  # series key -> its shard
    holder: dict[str, dict] = {}  # file -> its shard
    records = []
    for s in shards:
        part = manifest_discovery(s["manifest"])
        files = set(part.ledger.rows) | {f for u in part.units for f in u.files}
        for unit in part.units:
            if unit.key in owner:
                raise InputError(f"series {unit.key} is in two shards: {_name(owner[unit.key])} and {_name(s)}")
            owner[unit.key] = s
            record = read_record(s["dir"] / "parts", unit.key, unit.files)
            if record is None:
                raise InputError(f"series {unit.key} has no record in {_name(s)}: resume that shard, then merge again")
            records.append(record)
        for path in files:
            if path in holder:
                raise InputError(f"file {path!r} is in two shards: {_name(holder[path])} and {_name(s)}")
            holder[path] = s
        rows.update(part.ledger.rows)
        stages.update(part.ledger.stages)
    total = shards[0]["manifest"]["n_files_total"]
    n_files = sum(s["manifest"]["n_files"] for s in shards)
    if n_files != total:
        raise InputError(f"the shards account for {n_files} of the archive's {total} files: a shard's outputs are "
                         "incomplete; score the shards again")
    return Discovery([], Ledger(rows, stages), total), records


def _copy_reports(shards: list[dict], records: list[dict], out_dir: Path) -> None:
    """Each shard's saliency pages that a record names, into ``out_dir/reports/``."""
    by_shard = {}
    for s in shards:
        for unit in s["manifest"]["units"]:
            by_shard[unit["key"]] = s["dir"]
    for record in records:
        for item in record["items"]:
            if item.get("report"):
                target = out_dir / item["report"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(by_shard[record["key"]] / item["report"], target)


def _merged_run(runs: list[dict]) -> dict:
    merged = dict(runs[0])
    for key in SUMMED:
        merged[key] = sum(r[key] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    series = sum(r["series_per_min"] * r["wall_s"] / 60 for r in runs)
    merged.update(wall_s=round(wall, 3), series_per_min=round(series / wall * 60, 2) if wall else 0.0,
                  slices_per_s=round(merged["slices_scored"] / wall, 2) if wall else 0.0)
    return merged
