"""Grad-CAM target layer on EfficientNet-b0: pointing game and energy in lesion per layer and method.

Trains the easy phantom run of ``tests/easy_run.py`` (malignant mass vs normal, 96 px, 2 folds)
with extra ``--set``-style overrides, then explains every out-of-fold slice with its own fold's model
for the malignant class, at ``_conv_head``, ``_bn1``, the last MBConv block (stride 32) and the
outputs of stages 5, 4 and 3 (``_blocks.5`` stride 32; ``_blocks.4`` and ``_blocks.3`` stride 16),
and prints a table. ``PATIENTS`` (environment) sets the number of phantom patients (default 16).

    OMP_NUM_THREADS=2 PATIENTS=32 python benchmarks/bench_cam_layers.py OUT train.epochs=15 data.image_size=128
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.easy_run

from lung_effnet.explain.checks import localization  # noqa: E402
from lung_effnet.explain.gradcam import grad_cam, members_of  # noqa: E402
from lung_effnet.explain.oof_report import oof_inputs  # noqa: E402
from lung_effnet.explain.trained_run import load_run  # noqa: E402
from tests import easy_run as easy_phantoms  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder for the phantoms, the run and its cache")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=15")
    args = parser.parse_args()
    out, overrides = args.out, tuple(args.overrides) + ("report.enabled=false",)
    result = easy_phantoms.easy_run(out, overrides, int(os.environ.get("PATIENTS", easy_phantoms.N_PATIENTS)))
    run = load_run(result["run"])
    oof = result["summary"]["oof"]
    print(f"OOF AUROC malignant {oof['auroc_malignant']:.3f}, accuracy {oof['accuracy']:.3f}")
    print("layer       method     n  pointing  chance  energy  area")
    for layer in ("_conv_head", "_bn1", "last_block", "_blocks.5", "_blocks.4", "_blocks.3"):
        for method in ("gradcam", "gradcampp"):
            cams, masks, labels = [], [], []
            for fold, member in enumerate(members_of(run.predictor.model)):
                idx = [i for i, r in enumerate(run.oof) if int(r["fold"]) == fold]
                images, m = oof_inputs(run, idx)
                cams.append(grad_cam(member, torch.from_numpy(images), layer, class_idx=1, method=method))
                masks.append(m)
                labels += [1 if run.oof[i]["label"] == "malignant" else 2 for i in idx]
            v = localization(np.concatenate(cams), np.concatenate(masks), labels)["malignant"]
            print(f"{layer:<11} {method:<9} {v['n']:>3}  {v['pointing_hit_rate']:.3f}    {v['pointing_chance']:.3f}   "
                  f"{v['energy_in_lesion']:.4f}  {v['lesion_area']:.4f}")
