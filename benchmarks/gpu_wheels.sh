#!/usr/bin/env bash
# Run here (with internet to PyPI) before benchmarks/gpu_run.sh: the Python 3.12 wheels the GPU
# machine lacks (its image has torch, numpy, scipy, pyyaml, tqdm, scikit-learn, pillow, CuPy for
# CUDA 13; not MONAI, pydicom, nibabel, the JPEG 2000 codec, nvImageCodec or its nvJPEG2000 library), into .whl/ (ignored
# by git, carried to the device: keep it under ~50 MiB of the 64 MiB a call may carry).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
py=.venv/bin/python
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "monai==$(ver monai)" "pydicom==$(ver pydicom)" "nibabel==$(ver nibabel)" "pylibjpeg==$(ver pylibjpeg)" \
  "pylibjpeg-openjpeg==$(ver pylibjpeg-openjpeg)" nvidia-nvimgcodec-cu13 nvidia-nvjpeg2k-cu13
du -sh .whl && ls .whl
