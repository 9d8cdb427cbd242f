"""Stage script: score an archive of CT studies with a trained model.

``python pipelines/score_studies.py --model runs/exp1/model --input /data/archive --out scores`` is
``lung-effnet score`` with the same options; the work is ``lung_effnet.scoring.score_archive`` (discover ->
decode in workers -> fold ensemble -> per-series journal -> output files). See README.md, "Score".
"""

import sys

from lung_effnet.cli import main

if __name__ == "__main__":  # the guard also keeps decode workers (spawn / forkserver) from rerunning this
    sys.exit(main(["score", *sys.argv[1:]]))
