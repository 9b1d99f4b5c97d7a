#!/usr/bin/env bash
# One script for a lent GPU machine (no Ray, no project venv there; its python has torch, JAX,
# optax, pandas, pyarrow). Stages, each with a hard timeout, in order of value:
#   1. arch sweep: cube variants vs baselines on the split.parquet files in $ARCH_SPLITS (if set)
#   2. the GPU tests (CUDA parity of the graphed step), with the JAX peer's check beside them
#   3. the training-step table against JAX, 4. packing N processes on one GPU
#   OUT=/tmp/out ARCH_SPLITS=".gpu/a/split.parquet .gpu/b/split.parquet" bash bench/gpu_check.sh
# At most 7 files land in $OUT. Budget: ARCH_S (default 200) + about 330 s.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=
for cand in ${PYTHON:-} python3 python; do
    if command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null; then PY=$cand; break; fi
done
[ -n "$PY" ] || { echo "no python with torch found" | tee "$OUT/env.txt"; exit 1; }
T0=$SECONDS
stage() { echo "== $1 (at $((SECONDS - T0)) s)"; }

stage env
{ timeout 20 nvidia-smi -L
  timeout 60 "$PY" -c "import sys, torch; print(sys.executable, 'torch', torch.__version__, torch.cuda.get_device_name())"
  timeout 60 "$PY" -c "import jax, optax; print('jax', jax.__version__, jax.devices(), 'optax', optax.__version__)"; } 2>&1 | tee "$OUT/env.txt"

if [ -n "${ARCH_SPLITS:-}" ]; then
    stage "arch sweep"
    SPLITS=(); for s in $ARCH_SPLITS; do SPLITS+=(--split "$s"); done
    timeout -k 5 "${ARCH_S:-200}" "$PY" -m bench.arch_sweep "${SPLITS[@]}" --device cuda --seeds "${ARCH_SEEDS:-3}" \
        --jobs "${ARCH_JOBS:-8}" --variants "${ARCH_VARIANTS:-default,norm,mlp,mlp_ep24,mlp_ep24_off}" \
        --json "$OUT/arch_sweep.json" > "$OUT/arch_sweep.txt" 2>&1
    echo "arch sweep exit $?" >> "$OUT/arch_sweep.txt"; tail -40 "$OUT/arch_sweep.txt"
fi

# The JAX peer against train_epoch, on the CPU (JAX_PLATFORMS=cpu), beside the GPU tests.
JAX_PLATFORMS=cpu timeout -k 5 120 "$PY" -m bench.jax_cube --check >>"$OUT/env.txt" 2>&1 &
CHECK=$!

stage tests
timeout -k 5 120 "$PY" -m pytest -q -p no:cacheprovider -o filterwarnings= -o timeout=110 -rs --tb=short \
    tests/test_gpu.py tests/test_graph_step.py tests/test_model.py 2>&1 | tail -80 | tee "$OUT/tests.txt"
wait $CHECK; echo "jax check exit $?" >>"$OUT/env.txt"; tail -3 "$OUT/env.txt"

[ "${SKIP_BENCH:-0}" = 1 ] && { stage done; exit 0; }
stage "training step vs JAX"
timeout -k 5 180 "$PY" -m bench.gpu_step --no-compile --budget 2 --rounds 2 --deadline 110 \
    --json "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.txt"

stage packing
timeout -k 5 90 "$PY" -m bench.gpu_packing --seconds 5 2>&1 | tee "$OUT/packing.txt"
stage done
