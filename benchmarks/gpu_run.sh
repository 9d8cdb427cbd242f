#!/usr/bin/env bash
# One device call: the training and scoring benchmarks and the recipe grid on a CUDA GPU.
# Needs the carried wheels in .whl/ (monai, pydicom, nibabel) and .gpu/slices128.pt
# (python benchmarks/recipe_grid.py --export ...). Logs go to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LUNG_EFFNET_HASH_KEY=benchmark TQDM_DISABLE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python3 benchmarks/bench_train.py --device cuda 2>&1 | grep -v -i "warn" | tee "$OUT/bench_train.log"
timeout 120 python3 benchmarks/bench_score.py --device cuda --skip-naive --series 24 --slices 128 --workers 15 \
  --batch-size 128 --repeats 1 2>&1 | grep -v -i "warn" | tee "$OUT/bench_score.log"
timeout 220 python3 benchmarks/recipe_grid.py --slices .gpu/slices128.pt --device cuda --folds 3 \
  --recipes tutorial-8ep,project-8ep,project-30ep,project-30ep-noaug,project-30ep-runningbn,project-30ep-dc0.2 \
  2>&1 | grep -v -i "warn" | tee "$OUT/recipe_grid.log"
