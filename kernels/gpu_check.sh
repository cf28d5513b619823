#!/usr/bin/env bash
# One prepared GPU check: compiled-Triton correctness of the kernels, then the kernel benchmark with fla's
# chunk kernels timed in the same run. Writes logs, JUnit XML and JSON under OUTDIR (default: $OUT when set,
# else gpu_out). Usage, from the repository root: bash kernels/gpu_check.sh [OUTDIR]
#        (at most about 9.5 minutes; DRY_RUN=1: print the steps;
#        STEPS=tests_new,bench,tests_recurrent,tests_models picks steps; LIMIT_TESTS, LIMIT_BENCH in seconds)
# Needs `python3` with a CUDA torch and triton. fla wheels placed in .whl/ are installed to /tmp/site first.
set -u
OUTDIR=${1:-${OUT:-gpu_out}}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 PY=${PY:-python3}
export FLA_FLASH_QLA=0  # fla's own Triton kernels, not a FlashQLA dispatch: the comparison is Triton to Triton
STEPS=${STEPS:-tests_new,bench,tests_recurrent}  # steps to run, comma-separated (tests_models: when time allows)
run() {  # run SECONDS NAME CMD...: time-limited, output to OUTDIR/NAME.log, tail shown
  local limit=$1 name=$2; shift 2
  case ",$STEPS," in *",$name,"*) ;; *) echo "== $name: skipped"; return 0 ;; esac
  echo "== $name: $*"
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  tail -n "${TAILN:-6}" "$OUTDIR/$name.log"
  echo "== $name: exit $rc"
  echo "$name $rc" >>"$OUTDIR/steps.txt"
}
if [ "${DRY_RUN:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTDIR/gpu.txt"
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [ -d .whl/site ]; then export PYTHONPATH=$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}; fi  # fla, einops sources
  if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1; then
    echo "pip -e failed; using a PYTHONPATH farm"
    rm -rf /tmp/pp && mkdir -p /tmp/pp/metaplastic && cp -r unify/. /tmp/pp/metaplastic/
    for d in models kernels derivations; do ln -s "$PWD/$d" "/tmp/pp/metaplastic/$d"; done
    export PYTHONPATH=/tmp/pp${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PY -c "import torch, triton, metaplastic, importlib.metadata as m; print('torch', torch.__version__, 'triton',
triton.__version__, 'fla', m.version('flash-linear-attention') if [d for d in m.distributions()
if d.metadata['Name'] == 'flash-linear-attention'] else 'absent', torch.cuda.get_device_name())" | tee "$OUTDIR/versions.txt"
  $PY -m pip freeze >"$OUTDIR/pip_freeze.txt" 2>&1
fi
# 1. the chunked Triton path (forward + Triton backward, grouped b) and the per-value kernels, compiled
TAILN=8 run ${LIMIT_TESTS:-140} tests_new $PY -m pytest -q -p no:cacheprovider --junitxml="$OUTDIR/tests_new.xml" \
  tests/kernels/test_chunk_triton_backward.py tests/kernels/test_per_value_triton.py \
  tests/kernels/test_dispatch.py tests/kernels/test_chunk.py -k "triton or per_value or dispatch"
# 2. timings at B=8, T=4096, H=16, K=V=128, bf16 q/k/v, with fla in the same run, eager and as CUDA-graph
#    replays (interleaved); target ratios for both
#    (fla autotunes on first use: about 130 s per kernel on an H200, inside this step's limit)
TAILN=40 run ${LIMIT_BENCH:-330} bench $PY -m metaplastic bench kernels --device cuda --reps 5 --tf32 --dtype bfloat16 --cuda-graphs \
  --groups 8 --models mamba2 simple_gla palimpsa --backends triton_chunk triton_per_value \
  --json "$OUTDIR/bench_cuda.json" --targets "$OUTDIR/targets.json"
# 3. the fused recurrent kernel and the model-level GPU tests, with what time is left
TAILN=6 run 70 tests_recurrent $PY -m pytest -q -x -p no:cacheprovider --junitxml="$OUTDIR/tests_recurrent.xml" \
  tests/kernels/test_fused_recurrent.py -k "forward_float64 or gradients_float64 or float32 or varlen"
TAILN=6 run 90 tests_models $PY -m pytest -q -p no:cacheprovider --junitxml="$OUTDIR/tests_models.xml" \
  tests/models/test_mamba2.py tests/models/test_mixers.py tests/models/test_convert_gdn.py \
  tests/models/test_convert_gla.py tests/models/test_gla.py tests/models/test_convert_authors.py \
  tests/models/test_padded_generation.py -k "gpu or cuda"
[ -f "$OUTDIR/steps.txt" ] && cat "$OUTDIR/steps.txt"
exit 0
