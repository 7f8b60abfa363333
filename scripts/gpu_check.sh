#!/usr/bin/env bash
# The GPU check on a CUDA host without network access: the CUDA exactness tests, then
# `python -m emloc_agents.bench.gpu --context`, all results under $OUT (default: results/gpu). Run from the repo
# root with the package's wheels in `.whl` (../shared/tools/offline-gpu-wheels) and a Qwen2.5 tokenizer
# folder in `.gpu/qwen-tokenizer`. Usage: bash scripts/gpu_check.sh [BENCH_SECONDS] [extra bench args...]
# With CUDNN_AB=1 the same cases run a second time with cuDNN's attention allowed, into $OUT/cudnn
# (engine.forward.CUDA_ATTENTION_BACKENDS; pass --profile only to the first run's args).
set -u
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
limit=${1:-420}; shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a $OUT/gpu.txt
git rev-parse HEAD 2>/dev/null | tee -a $OUT/gpu.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_context_compression.py -k cuda 2>&1 \
  | tail -15 | tee $OUT/tests.txt
timeout "$limit" python3 -m emloc_agents.bench.gpu --out "$OUT" --tokenizer .gpu/qwen-tokenizer --context "$@" 2>&1 | tee $OUT/log.txt
if [ "${CUDNN_AB:-0}" = 1 ]; then
  args=(); skip=0
  for a in "$@"; do  # the A/B run repeats the cases, not the profile
    if [ $skip = 1 ]; then skip=0; continue; fi
    case $a in --profile|--profile-compression) skip=1 ;; *) args+=("$a") ;; esac
  done
  mkdir -p "$OUT/cudnn"
  timeout "$limit" python3 -m emloc_agents.bench.gpu --out "$OUT/cudnn" --tokenizer .gpu/qwen-tokenizer --context \
    --cudnn-attention "${args[@]}" 2>&1 | tee $OUT/cudnn/log.txt
fi
