"""Rebuild the saliency report of a finished ``train`` run: ``lung-effnet report`` or
``python -m pipelines.saliency_report --run DIR_OR_RUN_ID --out DIR``.

Thin: ``lung_effnet.trained_run.load_run`` opens the run (its folder, or an MLflow parent run id: the
run's outputs and its logged fold ensemble), ``build_oof_report`` explains and writes
``OUT/report.html`` (self-contained) and ``OUT/checks.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lung_effnet.report import build_oof_report
from lung_effnet.trained_run import load_run


def run_report(run: str | Path, out: str | Path, method: str = "gradcam", top: int = 2,
               tracking_uri: str | None = None) -> dict:
    """Report of ``run`` (folder or MLflow run id) into ``out``; returns ``build_oof_report``'s dict."""
    return build_oof_report(load_run(run, tracking_uri), Path(out), method=method, top=top)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", choices=["gradcam", "gradcampp"], default="gradcam")
    parser.add_argument("--top", type=int, default=2)
    parser.add_argument("--tracking-uri")
    args = parser.parse_args()
    print(run_report(args.run, args.out, args.method, args.top, args.tracking_uri)["html"])
