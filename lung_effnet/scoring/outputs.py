"""The files ``score`` writes, built from the per-unit records (``journal``).

- ``predictions.csv``: one row per scored series, volume or image (``PREDICTION_COLUMNS``), sorted
  by path then series UID. ``path`` is relative to ``--input``: the folder of a DICOM series, the
  file of a volume or image. ``key_slice`` indexes the canonical slice order (z increasing towards
  superior; ``slice_scores.csv``), ``key_file`` is the file that holds it.
- ``slice_scores.csv``: one row per scored slice (``SLICE_COLUMNS``); ``in_top_k`` marks the slices
  averaged into the series result.
- ``files.csv`` / ``errors.csv``: the ledger (``io.ledger``): input files = ledger rows, and a
  file is ``used`` only when its slice was scored.
- ``summary.json``: counts (identical for a resumed and an uninterrupted run) and this
  invocation's timing.

Nothing here reads a DICOM tag: rows hold relative paths, UIDs and numbers only (no PHI). UIDs link
results back to the archive; with ``--pseudonymize-uids`` (``io.privacy.UidPseudonyms``) every
Series Instance UID is replaced, from the discovery on (``pseudonymize_discovery``,
``pseudonymize_prepared``), so neither these files, the resume records nor the saliency pages hold
one; paths are still written as found.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lung_effnet.classes import CLASSES
from lung_effnet.io.ledger import USED, Ledger, write_csv
from lung_effnet.io.names import display_name
from lung_effnet.io.privacy import UidPseudonyms, uid_note, warn_uid_like_paths
from lung_effnet.models.training_data import IN_TRAINING
from lung_effnet.scoring.aggregate import abnormality, aggregate_series
from lung_effnet.scoring.discover import DICOM, Discovery, ScoreUnit
from lung_effnet.scoring.journal import write_atomic
from lung_effnet.scoring.prepare import FAILED as SERIES_FAILED
from lung_effnet.scoring.prepare import SCORED, PreparedUnit
from lung_effnet.scoring.prepare import SKIPPED as SERIES_SKIPPED

PREDICTION_COLUMNS = ("path", "series_uid", "kind", "n_slices", "p_benign", "p_malignant", "p_normal", "predicted",
                      "key_slice", "key_file", "status", "warnings", "report")
SLICE_COLUMNS = ("path", "series_uid", "slice_index", "file", "p_benign", "p_malignant", "p_normal", "abnormality",
                 "in_top_k")
PROB_FORMAT = "{:.6f}"


def pseudonymize_discovery(discovery: Discovery, uids: UidPseudonyms) -> Discovery:
    """The discovery with each DICOM unit's key (its Series Instance UID) and the header pass's ledger
    rows pseudonymized. Units keep their header index (``series``), which decoding needs: a worker
    names its rows by the unit's key, and ``pseudonymize_prepared`` maps anything else it returns.
    The key is also the resume record's identity, so a resumed run finds its records by pseudonym."""
    # Every series_uid here came from a DICOM header (the walk and the header pass name no other kind),
    # so each is pseudonymized whatever it looks like (``UidPseudonyms.identifier``).
    units = [dataclasses.replace(u, key=uids.identifier(u.key)) if u.kind == DICOM else u for u in discovery.units]
    ledger = Ledger({p: {**r, "series_uid": uids.identifier(r["series_uid"])} for p, r in discovery.ledger.rows.items()},
                    dict(discovery.ledger.stages))
    return Discovery(units, ledger, discovery.n_files)


def pseudonymize_prepared(prepared: PreparedUnit, uids: UidPseudonyms, dicom: bool = False) -> PreparedUnit:
    """A decoded unit whose series rows and ledger rows carry pseudonyms (before records and pages are made).
    ``dicom``: the unit is a DICOM series, so its UIDs are pseudonymized whatever they look like; a
    NIfTI volume's or an image's key (its relative path) only when it is shaped like a UID."""
    f = uids.identifier if dicom else uids
    return dataclasses.replace(
        prepared, key=f(prepared.key),
        items=[dataclasses.replace(i, series_uid=f(i.series_uid)) for i in prepared.items],
        ledger_rows=[{**r, "series_uid": f(r.get("series_uid", ""))} for r in prepared.ledger_rows])


def make_record(unit: ScoreUnit, prepared: PreparedUnit, probs: np.ndarray, top_k: int,
                report: Callable[[dict, np.ndarray], str] | None = None) -> dict:
    """The resume record of a scored unit. ``probs``: ``(N, 3)`` for ``prepared.images``;
    ``report(entry, rows)``, when given, writes a series' saliency page for its key slices
    (``rows``: indices into ``prepared.images``, most abnormal first) and returns its path."""
    items = []
    for item in prepared.items:
        entry: dict[str, Any] = {"path": item.path, "series_uid": item.series_uid, "kind": unit.kind, "status": item.status,
                 "warnings": item.warnings}
        if item.status in SCORED:
            p = probs[item.start:item.stop]
            score = aggregate_series(p, top_k)
            in_top = np.zeros(len(p), bool)
            in_top[score.top] = True
            entry.update(probs=score.probs.tolist(), predicted=score.predicted, key_slice=score.key_slice,
                         key_file=item.slice_files[score.key_slice],
                         slices=[[k, item.slice_files[k], *p[k].tolist(), bool(in_top[k])] for k in range(len(p))])
            entry["report"] = report(entry, item.start + score.top) if report is not None else ""
        items.append(entry)
    return {"key": unit.key, "files": unit.files, "items": items, "ledger": prepared.ledger_rows}


def _fmt(x: float) -> str:
    return PROB_FORMAT.format(x)


def prediction_rows(records: list[dict]) -> list[dict]:
    rows = []
    for item in (i for r in records for i in r["items"] if i["status"] in SCORED):
        # paths spelled as files.csv spells them (``display_name``): one name, one spelling
        rows.append({"path": display_name(item["path"]), "series_uid": item["series_uid"], "kind": item["kind"],
                     "n_slices": len(item["slices"]), **{f"p_{c}": _fmt(v) for c, v in zip(CLASSES, item["probs"])},
                     "predicted": item["predicted"], "key_slice": item["key_slice"], "key_file": display_name(item["key_file"]),
                     "status": item["status"], "warnings": "; ".join(item["warnings"]), "report": item["report"]})
    return sorted(rows, key=lambda r: (r["path"], r["series_uid"]))


def slice_rows(records: list[dict]) -> list[dict]:
    rows = []
    for item in (i for r in records for i in r["items"] if i["status"] in SCORED):
        for k, file, *p, top in item["slices"]:
            rows.append({"path": display_name(item["path"]), "series_uid": item["series_uid"], "slice_index": k,
                         "file": display_name(file),
                         **{f"p_{c}": _fmt(v) for c, v in zip(CLASSES, p)},
                         "abnormality": _fmt(float(abnormality(np.array([p]))[0])), "in_top_k": int(top)})
    return sorted(rows, key=lambda r: (r["path"], r["series_uid"], r["slice_index"]))


def final_ledger(discovery: Discovery, records: list[dict]) -> Ledger:
    """The header pass's rows, overridden by what decoding and scoring found per unit. A file the
    header pass found usable but that no record confirms was not scored, so it is not ``used``."""
    ledger = Ledger(dict(discovery.ledger.rows), dict(discovery.ledger.stages))
    confirmed = set()
    for row in (row for r in records for row in r["ledger"]):
        if row["status"] == USED:
            ledger.used(row["path"], row["series_uid"])
            confirmed.add(row["path"])
        else:
            getattr(ledger, row["status"])(row["path"], row["stage"], row["reason"], row["series_uid"])
    for path, row in list(ledger.rows.items()):
        if row["status"] == USED and path not in confirmed:
            ledger.failed(path, "score", "not scored (its series was not processed)", row["series_uid"])
    return ledger


def write_outputs(out_dir: Path, discovery: Discovery, records: list[dict], info: dict,
                  uids: UidPseudonyms | None = None, uid_summary: dict | None = None) -> dict:
    """Write the final files (module docstring) from all records; returns the summary. ``uids``: the
    pseudonyms the records were made with, noted in the summary (``uid_note``); ``uid_summary``:
    that note as given instead (``merge``, which joins records made elsewhere, holds no key)."""
    predictions, slices = prediction_rows(records), slice_rows(records)
    ledger = final_ledger(discovery, records)
    if uids is not None:
        warn_uid_like_paths(ledger.rows)
    write_csv(out_dir / "predictions.csv", PREDICTION_COLUMNS, predictions)
    write_csv(out_dir / "slice_scores.csv", SLICE_COLUMNS, slices)
    ledger.write(out_dir)
    items = [i for r in records for i in r["items"]]
    status = Counter(i["status"] for i in items)
    reasons = Counter((r["status"], r["reason"].split(":")[0]) for r in ledger.rows.values() if r["status"] != USED)
    summary = {
        "counts": {
            "series_scored": len(predictions), "series_ok": status["ok"], "series_incomplete": status["incomplete"],
            "series_failed": status[SERIES_FAILED], "series_skipped": status[SERIES_SKIPPED], "slices_scored": len(slices),
            "predicted": dict(sorted(Counter(r["predicted"] for r in predictions).items())),
            # series the model was trained on (``models.training_data``): their results mean nothing about new patients
            "series_in_training_data": sum(IN_TRAINING in i["warnings"] for i in items if i["status"] in SCORED),
            "files": {"total": len(ledger.rows), **ledger.counts()},
            "not_used_by_reason": [{"status": s, "reason": r, "files": n} for (s, r), n in sorted(reasons.items())],
        },
        **info,
        **(uid_note(uids) if uid_summary is None else uid_summary),
    }
    if len(ledger.rows) != discovery.n_files:  # the contract itself: never write a summary that breaks it
        raise RuntimeError(f"ledger has {len(ledger.rows)} rows for {discovery.n_files} input files")
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
