"""The fold ensemble alone, as trained against as scored: where a slice's model time goes.

Builds ``--folds`` fold models as training starts them (``cv.initial_member``: ``configs/default.yaml``'s
lesion finder and pretrained weights, at ``--image-size``), then times on random input, batch ``--batch``,
with no gradients (best of ``--repeats``):

- trained:    the ensemble as a model folder loads it (``FoldEnsemble``): each fold runs its own finder;
- scored:     ``bn_fold.inference_copy``, what ``score`` runs: BatchNorm and symmetric pads folded into the
              convolutions, and the finder every fold carries run once for all (``SharedLesionMap``);
- one finder: its part (the scored row less this, over ``--folds``, is one classifier's).

    python benchmarks/bench_ensemble.py --image-size 224
    python benchmarks/bench_ensemble.py --image-size 96 --folds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ms_per_slice(model, x, repeats: int) -> float:
    import torch

    best = float("inf")
    with torch.no_grad():
        model(x)  # warm-up (FX graphs, allocator)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    return best / len(x) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from lung_effnet.config import load_config
    from lung_effnet.console import format_table
    from lung_effnet.models.bn_fold import inference_copy
    from lung_effnet.models.lesion_finder import finder_of, has_finder
    from lung_effnet.models.predictor import FoldEnsemble
    from lung_effnet.training.cv import initial_member

    cfg = load_config(None, [f"data.image_size={args.image_size}"])
    torch.manual_seed(0)
    ensemble = FoldEnsemble([initial_member(cfg) for _ in range(args.folds)]).eval()
    channels = 2 * cfg.data.context_slices + 1
    x = torch.rand(args.batch, channels, args.image_size, args.image_size)
    rows = {"trained (FoldEnsemble, a finder run per fold)": ensemble, "scored (inference_copy)": inference_copy(ensemble)}
    if has_finder(ensemble.members[0]):
        rows["one finder"] = finder_of(ensemble.members[0])
    times = {}
    for name, model in rows.items():
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        times[name] = ms_per_slice(model, x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x,
                                   args.repeats)
    table = [[name, f"{t:.1f}", f"{1e3 / t:.1f}"] for name, t in times.items()]
    print(format_table(["model", "ms/slice", "slices/s"], table,
                       f"{args.folds}-fold {cfg.model.name} at {args.image_size} px, finder {cfg.model.lesion_finder}, batch "
                       f"{args.batch}, {torch.get_num_threads()} threads, best of {args.repeats}"))
    trained, scored = times["trained (FoldEnsemble, a finder run per fold)"], times["scored (inference_copy)"]
    print(f"scored / trained:  {trained / scored:.2f}x faster")


if __name__ == "__main__":
    main()
