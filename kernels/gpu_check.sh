#!/usr/bin/env bash
# One prepared GPU check: compiled-Triton correctness, then the kernel benchmark.
# Usage: bash kernels/gpu_check.sh [OUTDIR]   (uses `python3`, which must hold a CUDA torch and triton;
# fla wheels in .whl/ are installed to /tmp/site when present, for the fla comparisons).
set -u
OUTDIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1; then
  echo "pip -e failed; using a PYTHONPATH farm"
  rm -rf /tmp/pp && mkdir -p /tmp/pp/metaplastic && cp -r unify/. /tmp/pp/metaplastic/
  for d in models kernels derivations; do ln -s "$PWD/$d" "/tmp/pp/metaplastic/$d"; done
  export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import torch, triton, metaplastic; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
run() { echo "== $*"; "$@" 2>&1 | tail -${TAILN:-6}; }
TAILN=8 run timeout 130 $PY -m pytest -q -x -p no:cacheprovider tests/kernels/test_fused_recurrent.py \
  -k "forward_float64 or gradients_float64 or float32 or varlen"
run timeout 70 $PY -m pytest -q -p no:cacheprovider tests/kernels/test_chunk.py tests/kernels/test_dispatch.py -k "triton or cuda"
run timeout 70 $PY -m pytest -q -p no:cacheprovider tests/models/test_mamba2.py tests/models/test_mixers.py \
  tests/models/test_convert_gdn.py -k gpu
TAILN=40 run timeout 200 $PY -m metaplastic bench kernels --device cuda --reps 3 --tf32 \
  --models mamba2 simple_gla palimpsa meta_mamba2 gated_deltanet --json "$OUTDIR/bench_cuda.json"
