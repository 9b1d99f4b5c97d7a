#!/usr/bin/env bash
# One script for a lent GPU machine (no Ray, no project venv there; its python has torch, JAX,
# optax, pandas, pyarrow). Stages, each with a hard timeout, in order of value:
#   1. arch sweep: cube variants vs baselines on the run folders in $ARCH_SPLITS (if set)
#   2. the training-step table against JAX: eager, graphed conv3d and conv2d (TABLE_S, 180 s; 0 skips it)
#   3. the GPU tests (CUDA parity of the graphed step; TESTS_S, 150 s), the JAX peer's check beside them
#   4. if PROFILE lists kernel:precision pairs, a profile of each eager step (40 s each)
#   5. the table with torch.compile'd lattice steps (COMPILE_S, 170 s; COMPILE_KERNELS, COMPILE_BATCHES)
#   6. packing N processes on one GPU, if PACK_KERNEL names a kernel (PACK_S, 80 s)
#   OUT=/tmp/out PACK_KERNEL=conv2d bash bench/gpu_check.sh
# At most 8 files land in $OUT. Budget: about 590 s, plus ARCH_S (default 200) with ARCH_SPLITS.
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

# The JAX peer against train_epoch, on the CPU (JAX_PLATFORMS=cpu), beside the GPU stages.
JAX_PLATFORMS=cpu timeout -k 5 120 "$PY" -m bench.jax_cube --check >>"$OUT/env.txt" 2>&1 &
CHECK=$!

if [ "${SKIP_BENCH:-0}" != 1 ] && [ "${TABLE_S:-180}" -gt 0 ]; then
    stage "training step vs JAX: eager and graphed"
    timeout -k 5 "${TABLE_S:-180}" "$PY" -m bench.gpu_step --no-compile --budget 1.5 --rounds 1 --deadline $((${TABLE_S:-180} - 70)) \
        --kernels conv3d conv2d --json "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.txt"
fi

stage tests
timeout -k 5 "${TESTS_S:-150}" "$PY" -m pytest -q -p no:cacheprovider -o filterwarnings= -o timeout=140 -rs --tb=short \
    tests/test_gpu.py tests/test_graph_step.py tests/test_model.py 2>&1 | tail -80 | tee "$OUT/tests.txt"
wait $CHECK; echo "jax check exit $?" >>"$OUT/env.txt"; tail -3 "$OUT/env.txt"
[ "${SKIP_BENCH:-0}" = 1 ] && { stage done; exit 0; }

if [ -n "${PROFILE:-}" ]; then
    stage "where the GPU time goes (eager step, batch 1024)"
    for spec in $PROFILE; do  # e.g. PROFILE="conv3d:fp32 conv2d:bf16"
        timeout -k 5 40 "$PY" -m bench.gpu_profile --batch 1024 --kernel "${spec%%:*}" --precision "${spec##*:}" --top 10 2>&1 | grep -v "^USDT\|^STAGE:"
    done | tee "$OUT/profile.txt"
fi

stage "training step vs JAX: graphed + torch.compile"
timeout -k 5 "${COMPILE_S:-170}" "$PY" -m bench.gpu_step --batches ${COMPILE_BATCHES:-1024 256 32} --budget 1.5 --rounds 1 \
    --deadline "${COMPILE_DEADLINE:-$((${COMPILE_S:-170} - 60))}" \
    --kernels ${COMPILE_KERNELS:-conv2d im2col} --rows "graphed conv2d fp32" "graphed conv2d bf16" \
    "graphed+compile conv2d fp32" "graphed+compile conv2d bf16" "graphed+compile im2col fp32" "graphed+compile im2col bf16" \
    "jax fp32" "jax bf16 convs" --json "$OUT/compile.json" 2>&1 | tee "$OUT/compile.txt"

if [ -n "${PACK_KERNEL:-}" ]; then
    stage packing
    timeout -k 5 "${PACK_S:-80}" "$PY" -m bench.gpu_packing --seconds 4 --kernel "$PACK_KERNEL" 2>&1 | tee "$OUT/packing.txt"
fi
stage done
