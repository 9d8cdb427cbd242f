"""Score an archive of CT studies with a trained model: the ``score`` stage as a pipeline step.

``python -m pipelines.score_studies --model runs/exp1/model --input /data/archive --out scores``
is ``lung-effnet score`` with the same options; it composes ``lung_effnet.scoring.score_archive``
(discover -> decode in workers -> fold ensemble -> per-series journal -> output files) and prints
the summary. See README.md, "Score", for the outputs.
"""

from __future__ import annotations

import sys

from lung_effnet.cli import main


def run_score_studies(model: str, input_dir: str, out_dir: str, *extra: str) -> int:
    """Run the score stage; ``extra``: further ``lung-effnet score`` options (``--saliency``...)."""
    return main(["score", "--model", str(model), "--input", str(input_dir), "--out", str(out_dir), *extra])


if __name__ == "__main__":  # the guard also keeps decode workers (spawn / forkserver) from rerunning this
    sys.exit(main(["score", *sys.argv[1:]]))
