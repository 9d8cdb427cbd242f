#!/usr/bin/env bash
# One device call (about 9 minutes): training and scoring benchmarks on a CUDA GPU, logs in $OUT.
#
# Here, first:  bash benchmarks/gpu_wheels.sh          (the wheels the GPU image lacks, into .whl/)
# optionally:   python benchmarks/recipe_grid.py --export .gpu/slices128.pt ...   (the recipe grid's input)
# then:         the device tool's run with command "bash benchmarks/gpu_run.sh", carry [".whl", ".gpu"],
#               timeout_s 600 (each step below has its own timeout; they add up to 560 s).
#
# 1. which decoder compressed DICOM gets (nvImageCodec registered and checked pixel-equal, or the CPU);
# 2. bench_train (a)-(d): targets b >= 0.9 a, b >= 4 c, d > 3,304 images/s;
# 3. bench_score, uncompressed and JPEG 2000: target project slices/s >= 0.8 x raw parallel decode,
#    and the data path (decode in 15 workers, window/crop/resize on the GPU) against raw decode;
# 4. the recipe grid, when .gpu/slices128.pt was carried.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LUNG_EFFNET_HASH_KEY=benchmark TQDM_DISABLE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
date -u | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
python3 -c "import torch, monai, pydicom; print('torch', torch.__version__, 'monai', monai.__version__, 'pydicom', pydicom.__version__)" | tee -a "$OUT/gpu.txt"
timeout 40 python3 -c "from lung_effnet.io.gpu_decode import enable_gpu_decode; print('compressed DICOM:', enable_gpu_decode())" \
  2>&1 | tee -a "$OUT/gpu.txt"
timeout 160 python3 benchmarks/bench_train.py --device cuda 2>&1 | grep -v -i "warn" | tee "$OUT/bench_train.log"
timeout 100 python3 benchmarks/bench_score.py --device cuda --skip-naive --series 24 --slices 128 --workers 15 \
  --batch-size 128 --repeats 1 2>&1 | grep -v -i "warn" | tee "$OUT/bench_score.log"
timeout 100 python3 benchmarks/bench_score.py --device cuda --skip-naive --compression jpeg2000 --series 8 --slices 64 \
  --workers 15 --batch-size 128 --repeats 1 2>&1 | grep -v -i "warn" | tee "$OUT/bench_score_j2k.log"
if [ -f .gpu/slices128.pt ]; then
  timeout 160 python3 benchmarks/recipe_grid.py --slices .gpu/slices128.pt --device cuda --folds 3 \
    --recipes tutorial-8ep,project-8ep,project-30ep,project-30ep-noaug \
    2>&1 | grep -v -i "warn" | tee "$OUT/recipe_grid.log"
fi
