"""Stage script: rebuild the saliency report of a finished ``train`` run.

``python pipelines/saliency_report.py --run DIR_OR_RUN_ID --out DIR`` is ``lung-effnet report`` with the same
options; the work is ``lung_effnet.explain.trained_run.load_run`` then ``lung_effnet.explain.oof_report.build_oof_report``.
"""

import sys

from lung_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
