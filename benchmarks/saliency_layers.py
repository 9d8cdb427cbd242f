"""Where does a finished run's Grad-CAM point, layer by layer? The report's localization checks at other layers.

``lung-effnet report`` reads one target layer (``resolve_target_layer``: ``_blocks.3``, chosen by
``bench_cam_layers.py`` on a model that finds lesions from slice labels; ``_blocks.0`` for a model that reads a
lesion finder's map, chosen with this script). A model that reads lesions differently may carry its class
evidence at another stage. This reruns the report's own checks
(``faithfulness_checks``: up to 200 out-of-fold cases with a lesion mask, each explained by its own fold's
model for its true class) at each ``--layer`` and prints, per class, the pointing-game hit rate, its chance
(a uniformly random point), the share of the map's energy inside the lesion over the lesion's share of
the image (1 = no better than a uniform map), and the layer's model-parameter randomization test (median
Spearman rho between the maps of the trained folds and of re-initialised copies; below 0.5 passes).

    python benchmarks/saliency_layers.py --run RUN --layer _blocks.2 --layer _blocks.3
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a train output folder, or an MLflow parent run id")
    ap.add_argument("--layer", action="append", required=True, help="a module name of the fold model (repeat)")
    ap.add_argument("--method", choices=("gradcam", "gradcampp"), default="gradcam")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--randomization", type=int, default=16, metavar="N",
                    help="cases of the model-parameter randomization test per layer (default 16, as the report)")
    args = ap.parse_args()
    from lung_effnet.explain.oof_report import faithfulness_checks
    from lung_effnet.explain.trained_run import load_run

    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    print("| layer | class | cases | pointing | chance | energy in lesion / lesion area | randomization: median rho (passed) |")
    print("|---|---|---|---|---|---|---|")
    for layer in args.layer:
        checks = faithfulness_checks(run, args.method, layer, max_cases=200, n_randomization=args.randomization)
        rand = checks["randomization"]
        rho = f"{rand['median_rho']:.2f} ({'yes' if rand['passed'] else 'no'})" if rand.get("n") else "-"
        for name, loc in sorted(checks["localization"].items()):
            ratio = loc["energy_in_lesion"] / loc["lesion_area"] if loc["lesion_area"] else float("nan")
            print(f"| {layer} | {name} | {loc['n']} | {loc['pointing_hit_rate']:.3f} | {loc['pointing_chance']:.3f} "
                  f"| {ratio:.2f} | {rho} |", flush=True)


if __name__ == "__main__":
    main()
