#!/usr/bin/env bash
# Ray on a lent GPU machine (issue 22), in two steps.
#
#   bash bench/gpu_ray.sh pack      # here, on the CPU machine: fills .gpu/ (git-ignored, < 64 MiB)
#   bash bench/gpu_ray.sh run       # there: the device tool's `run` with carry=[".gpu"], e.g.
#       run(command="OUT=$OUT bash bench/gpu_ray.sh run", carry=[".gpu"], timeout_s=480)
#
# pack: Ray 2.60's cp312 wheel unpacked without ray/jars, ray/rllib, tests and __pycache__, as
# .gpu/ray.tar.xz; the wheels Ray, Tune, Serve and cube need that the GPU image lacks (it has
# torch, pyarrow, pandas, aiohttp, psutil, pyyaml, requests: KINDS.md), in .gpu/wheels; and the
# data, .gpu/pairs.parquet: MedQuAD's 3,000-pair sample with MiniLM embeddings, so the GPU
# machine needs no teacher. run: installs those beside the image's Python (no network there),
# then `python -m bench.gpu_ray --device cuda`, each section bounded, results in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-run}
PY=${PYTHON:-python3}
DEPS="jsonschema referencing jsonschema-specifications rpds-py attrs tensorboardX pydantic pydantic-core
annotated-types typing-inspection fastapi starlette uvicorn aiohttp-cors colorful opencensus
opencensus-context smart-open py-spy optuna alembic sqlalchemy colorlog mako greenlet gguf safetensors"

if [ "$WHAT" = pack ]; then
    PY=.venv/bin/python
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/dl
    $PY -m pip download -q "ray==2.60.0" --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .gpu/dl
    tmp=$(mktemp -d)
    $PY -m zipfile -e .gpu/dl/ray-*.whl "$tmp"
    rm -rf "$tmp/ray/jars" "$tmp/ray/rllib"
    find "$tmp" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
    tar -C "$tmp" -cJf .gpu/ray.tar.xz .
    rm -rf "$tmp" .gpu/dl
    # shellcheck disable=SC2086
    $PY -m pip download -q $DEPS --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .gpu/wheels --no-deps
    $PY - <<'PYEOF'
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from cube.data.qa import load_qa
from cube.teachers import HFTeacher, TeacherConfig
df = load_qa("../shared/datasets/medquad.jsonl")
t = HFTeacher(TeacherConfig())
emb = lambda texts: np.concatenate([t.embed(texts[i:i + 64]).vectors for i in range(0, len(texts), 64)])
q, a = emb(df["question"].tolist()), emb(df["answer"].tolist())
col = lambda v: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
pq.write_table(pa.table({"question": df["question"], "answer": df["answer"], "topic": df["topic"],
                         "question_embedding": col(q), "answer_embedding": col(a)}), ".gpu/pairs.parquet")
PYEOF
    du -sh .gpu/ray.tar.xz .gpu/wheels .gpu/pairs.parquet .gpu
    exit 0
fi

OUT=${OUT:-/tmp/gpu_ray_out}
mkdir -p "$OUT"
SITE=$(mktemp -d)
tar -C "$SITE" -xJf .gpu/ray.tar.xz
$PY -m pip install -q --no-index --no-deps --target "$SITE" .gpu/wheels/*.whl 2>&1 | tail -3 || true
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 PATH="$SITE/bin:$PATH"
# Ray's console scripts are not on PATH from a --target install: Ray starts its processes with
# this interpreter, so a wrapper named `ray` is all that `ray start` and the job tools need.
printf '#!/bin/sh\nexec %s -m ray.scripts.scripts "$@"\n' "$(command -v "$PY")" > "$SITE/bin/ray" 2>/dev/null \
    || { mkdir -p "$SITE/bin"; printf '#!/bin/sh\nexec %s -m ray.scripts.scripts "$@"\n' "$(command -v "$PY")" > "$SITE/bin/ray"; }
chmod +x "$SITE/bin/ray"
{ nvidia-smi -L; $PY -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__)"; } \
    2>&1 | tee "$OUT/env.txt"
timeout -k 10 "${GPU_RAY_S:-450}" $PY -m bench.gpu_ray --data .gpu/pairs.parquet --device cuda --out "$OUT" \
    --section-s 150 2>&1 | tail -60
