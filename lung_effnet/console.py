"""Plain-text tables for the terminal (what a researcher reads at the end of a run)."""

from __future__ import annotations

from pathlib import Path


def format_table(header: list[str], rows: list[list], title: str = "") -> str:
    """A fixed-width table; numbers right-aligned, text left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(header))]

    def line(r):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def print_ingest_summary(summary: dict, out_dir: Path) -> None:
    """Samples and patients per class, series read, files not used by reason."""
    print()
    if summary["labels_known"]:
        rows = [[c, v["samples"], v["patients"]] for c, v in summary["per_class"].items()]
        rows.append(["total", summary["samples"], sum(v["patients"] for v in summary["per_class"].values())])
        print(format_table(["class", "samples", "patients"], rows, "Samples"))
        print()
    by_status = summary["series_by_status"]
    print(format_table(["series", "count"], [[s, n] for s, n in sorted(by_status.items())] + [["total", summary["series"]]],
                       "Series and volumes found"))
    print()
    files = summary["files"]
    print(f"Files: {sum(files.values())} in = {files['used']} used + {files['skipped']} skipped + {files['failed']} failed")
    if summary["not_used_by_reason"]:
        print(format_table(["status", "files", "reason"],
                           [[r["status"], r["files"], r["reason"]] for r in summary["not_used_by_reason"]]))
    print()
    for warning in summary["warnings"]:
        print(f"WARNING: {warning}\n")
    print(f"Outputs in {out_dir}: " + ", ".join(
        n for n in ("manifest.csv", "series.csv", "files.csv", "errors.csv", "ingest.json") if (Path(out_dir) / n).exists()))


CV_COLUMNS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "auroc_benign", "auroc_malignant",
              "auroc_normal", "ece")


def print_cv_summary(summary: dict, out_dir: Path) -> None:
    """Per-fold metrics, the pooled out-of-fold row with 95% CIs, warnings, and where to look next."""
    rows: list[list] = [[f"fold {f['fold']}", f"{f['n_slices']} slices"] + [f"{f[c]:.3f}" for c in CV_COLUMNS]
                        for f in summary["folds"]]
    levels = [("out-of-fold", "oof", "n_slices", "slices"), ("per series", "oof_series", "n_series", "series"),
              ("per patient", "oof_patients", "n_patients", "patients")]
    for name, key, count, unit in levels:
        level = summary[key]
        rows.append([name, f"{level[count]} {unit}"] + [f"{level[c]:.3f}" for c in CV_COLUMNS])
        rows.append(["  95% CI", ""] + [f"{level[c + '_ci95'][0]:.2f}-{level[c + '_ci95'][1]:.2f}" for c in CV_COLUMNS])
    if "test" in summary:
        rows.append(["held-out test", ""] + [f"{summary['test'][c]:.3f}" for c in CV_COLUMNS])
    print()
    print(format_table(["", "n"] + [c.replace("balanced_accuracy", "bal_acc") for c in CV_COLUMNS], rows,
                       f"Cross-validation ({summary['n_patients']} patients; series and patients: mean of their "
                       f"{summary['aggregation']['top_k']} most abnormal slices, as score; CIs: patient bootstrap)"))
    oof = summary["oof"]
    pairs = [k for k in oof if k.startswith("auroc_") and "_vs_" in k and not k.endswith("_ci95")]
    if pairs:  # a class's one-vs-rest AUROC mixes its two confusions; the pairs tell them apart
        print("\nPairwise AUROC, out of fold (95% CI): " + "; ".join(
            f"{k[len('auroc_'):].replace('_vs_', ' vs ')} {oof[k]:.3f} ({oof[k + '_ci95'][0]:.2f}-{oof[k + '_ci95'][1]:.2f})"
            for k in pairs))
    for warning in summary.get("warnings", []):
        print(f"\nWARNING: {warning}")
    mlflow_info = summary.get("mlflow", {})
    print(f"\nOutputs in {out_dir}: cv_summary.json, oof_predictions.csv, folds.csv, plots/, model/")
    report = Path(out_dir) / "saliency" / "report.html"
    if report.exists():
        print(f"Grad-CAM review (opens offline): {report}")
    if mlflow_info:
        print(f"MLflow run {mlflow_info['parent_run_id']} in experiment '{mlflow_info['experiment']}'; model {mlflow_info['model_uri']}")
        uri = mlflow_info["tracking_uri"]
        if uri.startswith("sqlite:"):
            print(f"Open the MLflow UI:  mlflow ui --backend-store-uri {uri}")
        else:
            print(f"MLflow UI: {uri}")
