"""Stage script: the main job on embedded defaults (synthetic DICOM archive -> patient-grouped CV -> report).

``python pipelines/demo.py [--out demo_output] [--seed 0] ...`` is ``lung-effnet demo`` with the same options
(``--help`` lists them); the work is ``lung_effnet.demo.run_demo``.
"""

import sys

from lung_effnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
