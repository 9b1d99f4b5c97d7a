#!/usr/bin/env bash
# One short script for a lent GPU machine (no Ray there): the cube library's GPU tests,
# its training-step FLOP/s against a matmul, and the architecture sweep on carried embeddings.
#   OUT=/tmp/out bash bench/gpu_check.sh     (split files are expected in .gpu/)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider -o filterwarnings= -o timeout=300 \
    tests/test_gpu.py tests/test_model.py tests/test_losses_metrics.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
for b in 32 256; do python3 -m bench.cube_flops --device cuda --batch $b --steps 20; done 2>&1 | tee "$OUT/flops.txt"
python3 -m bench.arch_sweep --split .gpu/smollm2_split.parquet --device cuda --seeds 3 --json "$OUT/sweep_smollm2.json" 2>&1 \
    | tee "$OUT/sweep_smollm2.txt" | tail -20
