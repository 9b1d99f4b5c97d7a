"""Serving p50 against bank size: /v1/answer with banks of 10k, 100k and 1M answers, exact search
and faiss IVF, side by side on one Ray Serve app.

    python -m bench.serve_bank --run runs/demo --sizes 10000 100000 1000000 --requests 60

For each size, a copy of the run's small files (model, config, teacher) gets a synthetic bank:
the run's own answers plus random answers around them (its teacher's dimension), written as the
run's bank artefact, and its IVF index is built once beside it, as training does with
`bank_index.kind=ivf` (timed). The app is deployed with configs/serve_laptop.yaml and search exact,
then ivf (the replica loads that index); `--requests` sequential questions (the run's held-out
ones) measure the p50 and p99 of /v1/answer, and in process the IVF's recall@10 against exact
search on the same questions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

ROOT = Path(__file__).resolve().parent.parent


def make_run(run: Path, size: int, into: Path) -> Path:
    from cube.data.bank import AnswerBank, BankWriter
    from cube.data.rundir import RunDir

    copy = into / f"bank-{size}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("ray", "bank", "split", "tensorboard", "analysis"))
    src = RunDir(run)
    real = AnswerBank.read(src.bank_root(), torch.zeros(1))
    out = RunDir(copy)
    writer = BankWriter(str(copy / "bank"))
    writer.add(real.texts[:size], real.vectors[:size].float().numpy())
    rng = np.random.default_rng(0)
    made = len(real.texts)
    while made < size:
        n = min(100_000, size - made)
        base = real.vectors[rng.integers(0, len(real.texts), n)].float().numpy()
        vecs = base + 0.5 * rng.normal(size=base.shape).astype(np.float32) / np.sqrt(base.shape[1])
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        writer.add([f"synthetic answer {made + i}" for i in range(n)], vecs)
        made += n
    rows = writer.close()
    split = src.split()  # the copy reads the original's split for its held-out questions
    info = src.split_info()
    (copy / "split.json").write_text(json.dumps({**info, "root": str(Path(split.root).resolve())}))
    out.write_bank_info(str(copy / "bank"), rows, "float32")
    return copy


def build_index(run: Path) -> float:
    """Seconds to build and save the bank's IVF index once, as training's bank_index.kind=ivf does."""
    from cube.data.bank import AnswerBank, SearchConfig
    from cube.train.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    model, _ = load_checkpoint(run / "model")
    AnswerBank.read(str(run / "bank"), model.a_mean).write_index(str(run / "bank"), SearchConfig(kind="ivf"))
    return time.perf_counter() - t0


def p50(url: str, questions: list[str], n: int) -> tuple[float, float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        r = requests.post(f"{url}/v1/answer", json={"question": questions[i % len(questions)]}, timeout=120)
        r.raise_for_status()
        times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(times[3:])  # the first requests warm the replicas
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def recall_at_10(run: Path, questions: list[str], kind: str) -> float:
    from cube.data.bank import SearchConfig
    from cube.eval.inference import predict
    from serve.pipeline import LoadedRun

    loaded = LoadedRun(run)
    from cube.teachers import load_teacher

    vectors = load_teacher(loaded.teacher).embed(questions).vectors
    pred = predict(loaded.model, torch.from_numpy(vectors))
    exact = [{a.answer for a in row} for row in loaded.bank.top(pred, 10)]
    loaded.bank.index_with(SearchConfig(kind=kind), prebuilt=str(run / "bank"))
    approx = [{a.answer for a in row} for row in loaded.bank.top(pred, 10)]
    return float(np.mean([len(e & a) / 10 for e, a in zip(exact, approx)]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args()
    from cube.data.rundir import RunDir
    from jobs.common import ensure_ray, setup_logging
    from jobs.serve import start, stop

    setup_logging()
    ensure_ray()
    questions = RunDir(args.run).split().table("test", ["question"]).column("question").to_pylist()[:200]
    laptop = ROOT / "configs" / "serve_laptop.yaml"
    with tempfile.TemporaryDirectory(dir=args.run.parent) as tmp:
        for size in args.sizes:
            run = make_run(args.run, size, Path(tmp))
            index_s = build_index(run)
            for kind in ("exact", "ivf"):
                t0 = time.perf_counter()
                url = start(run, port=args.port, config=laptop, overrides=[f"search.kind={kind}"])
                up = time.perf_counter() - t0
                try:
                    mid, tail = p50(url, questions, args.requests)
                finally:
                    stop()
                row = {"bank": size, "search": kind, "p50_ms": round(mid, 1), "p99_ms": round(tail, 1),
                       "start_s": round(up, 1)}
                if kind == "ivf":
                    row["index_build_s"] = round(index_s, 1)
                    row["recall_at_10_vs_exact"] = round(recall_at_10(run, questions, kind), 3)
                print(json.dumps(row), flush=True)
            shutil.rmtree(run)


if __name__ == "__main__":
    main()
