#!/usr/bin/env bash
# The GPU checks of one device lease, in one command: the gpu test tier and the BLIP-base
# captioning benchmark (bench/bench_caption_gpu.py, goal >= 1,500 cells/s on one H200).
#
# Runs with an existing Python that has CUDA torch (default `python3`; on the lent H200 image
# that one holds torch, transformers, numpy, pillow, safetensors, opencv, tifffile, pytest and
# nvidia-ml-py, which is all these checks import: no venv, nothing downloaded). The job's own
# GPU test (tests/test_job_gpu.py) needs Ray and moto as well and is not run here.
#
#   bash bench/gpu_check.sh            # logs under $OUT (default /tmp/gpu-check)
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh
set -u -o pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
cd "$(dirname "$0")/.."
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"; } | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt" || status=1
timeout 300 "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts="-ra --strict-markers" 2>&1 \
  | tee "$OUT/tests.log" || status=1
timeout 300 "$PY" -m bench bench_caption_gpu 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
