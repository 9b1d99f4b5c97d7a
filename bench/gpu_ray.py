"""Ray Train, Tune and Serve on a GPU, in one run (issue 22): what `bench/gpu_ray.sh` runs on a lent
GPU machine, and what tests/test_gpu_ray.py runs here on the CPU (`--device cpu --quick`) so that
it cannot rot.

    python -m bench.gpu_ray --data PAIRS.parquet --device cuda --out OUT     # the lent GPU machine
    python -m bench.gpu_ray --data PAIRS.parquet --device cpu --quick --out OUT

PAIRS.parquet carries its embeddings (question_embedding, answer_embedding: `bench/gpu_ray.sh pack`
makes it from MedQuAD with MiniLM), so the GPU machine never needs a teacher for training. Each
section writes OUT/<section>.json as it ends, so a run cut short keeps what it finished:

1. train: `cube train` (1 worker, use_gpu, the graphed step on CUDA) for a few epochs; samples/s
   through Ray against the same step in this process without Ray (ratio), the epoch time, peak
   GPU memory; then a run killed after its first epoch and resumed from its checkpoint.
2. ingest: one Ray Train worker trains from its Ray Data shard (`iter_torch_batches`), then from
   the same rows already in device memory (bench/stream_throughput.py's worker): ratio.
3. tune: 8 small trials at gpus_per_trial=0.25, four at a time, against the same 8 at a whole GPU
   each, one at a time: trials per hour (ratio), and any trial that errored (out of memory).
4. serve: the cube predictor (and the teacher embedder, where the teacher is on the machine) with
   a quarter of a GPU each against the same on CPU: p50 and p99 of /v1/answer at 1 and 32
   concurrent clients, and the batch sizes `@serve.batch` formed.
5. precision: validation MRR of fp32, TF32 and bf16 training on the same data and seed.

`--quick` on the CPU runs each path once: one sweep (without a GPU, packed and whole trials are
the same sweep), the train section's run in bf16 (the precision section reports it rather than
start Ray Train once more), and no kill-and-resume (the suite's tests/test_training_ray.py kills a
driver and resumes on the CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
TRIAL_SPACE = "cube.hidden: {distribution: choice, values: [16, 32]}\n"


def save(out: Path, name: str, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"== {name}: {json.dumps(result)}", flush=True)


def train_config(args: argparse.Namespace, *extra: str) -> list[str]:
    sets = ["workers=1", f"use_gpu={str(args.device == 'cuda').lower()}", f"optim.epochs={args.epochs}",
            "baselines=identity,ridge", "val_questions=500", *extra]

    if args.quick:  # bf16: the precision section's one run (section_precision)
        sets += ["optim.precision=bf16", "cube.width=6", "cube.height=6", "cube.depth=4", "cube.steps=4",
                 "cube.channels=6", "cube.hidden=16", "cube.io_channels=2", "optim.batch_size=32"]
    return sets


def cube_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", *args]


def section_train(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`cube train` through Ray, the same step without Ray, and a kill-and-resume."""
    import pandas as pd

    from cube.config import load_config
    from cube.data.rundir import RunDir
    from cube.eval.metrics import Split
    from cube.job_config import TrainConfig
    from cube.train.loop import build_model, fit
    from jobs.trainer import train

    run = work / "train"
    cfg = load_config(TrainConfig, None, train_config(args))
    start = time.perf_counter()
    report = train(args.data, run, cfg)
    took = time.perf_counter() - start
    metrics = pd.read_csv(run / "metrics.csv")
    ray_rate = float(metrics["samples_per_s"].iloc[1:].median() if len(metrics) > 1 else metrics["samples_per_s"][0])
    # the same step, in this process, on the same rows already on the device
    split = RunDir(run).split()
    device = torch.device(args.device)
    m = RunDir(run).moments()
    model = build_model(cfg.cube, torch.tensor(m.q_mean).float(), torch.tensor(m.a_mean).float(), device)
    seen: list[float] = []
    train_split = split.split("train")
    fit(model, Split(train_split.q.to(device), train_split.a.to(device)),
        split.held_out("val", questions=cfg.val_questions), cfg.loss, cfg.optim,
        on_epoch=lambda end: seen.append(end.metrics["samples_per_s"]))
    local_rate = statistics.median(seen[1:] or seen)
    result = {"device": args.device, "precision": cfg.optim.precision, "epochs": int(len(metrics)),
              "seconds": round(took, 1),
              "epoch_seconds": round(took / max(len(metrics), 1), 1),
              "samples_per_s_ray": round(ray_rate), "samples_per_s_without_ray": round(local_rate),
              "ratio_ray_to_without": round(ray_rate / local_rate, 3),
              "peak_memory_mb": float(metrics["peak_memory_mb"].max()), "test_mrr": report["cube"]["mrr"]}
    if args.quick:  # the CPU check: tests/test_training_ray.py already kills a driver and resumes on the CPU
        return {**result, "resume": "skipped in --quick"}
    # killed after its first epoch, then resumed from its checkpoint
    resumed = work / "resumed"
    sets = [a for s in train_config(args, f"optim.epochs={max(args.epochs, 3)}") for a in ("--set", s)]
    proc = subprocess.Popen(cube_cmd("train", "--data", str(args.data), "--output", str(resumed), *sets), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + args.section_s
    while not ((resumed / "metrics.csv").is_file() and len(pd.read_csv(resumed / "metrics.csv")) >= 1):
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = subprocess.run(cube_cmd("train", "--resume", str(resumed)), cwd=ROOT, capture_output=True, text=True,
                           timeout=args.section_s)
    after = pd.read_csv(resumed / "metrics.csv") if (resumed / "metrics.csv").is_file() else pd.DataFrame()
    return {**result, "resume_returncode": again.returncode,
            "resume_epochs": after["epoch"].tolist() if len(after) else [],
            "resumed_from": int(after["resumed_from"].max()) if len(after) else None,
            "resume_error": again.stderr[-500:] if again.returncode else ""}


def section_ingest(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench.stream_throughput import measure

    rows = 4_000 if args.quick else 100_000
    return measure(work / "train", rows, 3, [], use_gpu=args.device == "cuda")


def section_tune(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    space = work / "space.yaml"
    space.write_text(TRIAL_SPACE)
    gpu = args.device == "cuda"
    result: dict[str, Any] = {}
    # Without a GPU the two sweeps differ only in how many trials run at once: the CPU check runs one
    placements = (("packed", 0.25, 4), ("whole", 1.0, 1)) if gpu else (("packed", 0.25, 4),)
    for name, per_trial, at_once in placements:
        out = work / f"sweep-{name}"
        sets = [a for s in train_config(args, "optim.epochs=2") for a in ("--set", s)]
        cmd = cube_cmd("tune", "--data", str(args.data), "--space", str(space), "--output", str(out),
                       "--trials", str(args.trials), "--scheduler", "fifo", "--robustness-seeds", "0",
                       "--max-concurrent", str(at_once if gpu else min(at_once, 2)),
                       "--cpus-per-trial", "1" if gpu else "0.5", *sets)
        if gpu:
            cmd += ["--gpus-per-trial", str(per_trial)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.section_s)
        took = time.perf_counter() - start
        import pandas as pd

        table = pd.read_csv(out / "results.csv") if (out / "results.csv").is_file() else pd.DataFrame()
        errors = table.loc[table["status"] == "errored", "error"].tolist() if len(table) else []
        result[name] = {"gpus_per_trial": per_trial if gpu else 0, "at_once": at_once, "seconds": round(took, 1),
                        "trials_per_hour": round(args.trials / took * 3600), "returncode": proc.returncode,
                        "errored": errors, "out_of_memory": any("out of memory" in e.lower() for e in errors)}
    if "whole" in result:
        packed, whole = result["packed"]["trials_per_hour"], result["whole"]["trials_per_hour"]
        result["ratio_packed_to_whole"] = round(packed / whole, 2)
    return result


async def _load(handle: Any, vectors: list[Any], clients: int, requests_total: int) -> dict[str, Any]:
    latencies: list[float] = []
    batches: list[int] = []
    queue = list(range(requests_total))

    async def client() -> None:
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            result = await handle.answer.remote(vectors[i % len(vectors)], 5)
            latencies.append((time.perf_counter() - t0) * 1e3)
            batches.append(int(result["batch_size"]))

    await asyncio.gather(*(client() for _ in range(clients)))
    ms = sorted(latencies[min(5, len(latencies) - 1):])  # the first calls warm the replica
    return {
        "clients": clients,
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1),
        "batch_sizes": {str(k): batches.count(k) for k in sorted(set(batches))},
    }


def section_serve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The CubePredictor deployment (the cube and the answer bank, `@serve.batch`) on a quarter of
    a GPU against the same on CPU, called through its handle with the test questions' vectors.
    The teacher embedder is left out: its model cannot travel to the GPU machine beside Ray
    within a run's 64 MiB (docs/gpu.md)."""
    from ray import serve

    from cube.config import to_dict
    from cube.data.rundir import RunDir
    from serve.pipeline import Embedded, teacher_key
    from serve.predictor import CubePredictor
    from serve.settings import load_settings

    run = RunDir(work / "train")
    teacher, _ = run.teacher()
    key = teacher_key(teacher.identity())
    q = run.split().split("test", limit=400).q.numpy()
    vectors = [Embedded(v, key, 0.0, 1) for v in q]
    result: dict[str, Any] = {}
    placements = [("cpu", [])] + ([("gpu", ["predictor.num_gpus=0.25"])] if args.device == "cuda" else [])
    for name, overrides in placements:
        cfg = load_settings(ROOT / "configs" / "serve_laptop.yaml", overrides=overrides)
        app = CubePredictor.options(**cfg.predictor.options(), user_config={
            "max_batch_size": cfg.predictor.max_batch_size, "batch_wait_timeout_s": cfg.predictor.batch_wait_timeout_s,
        }).bind(str(run.path), None, None, to_dict(cfg.predictor), to_dict(cfg.search))
        handle = serve.run(app, name="gpu-bench", route_prefix=None)
        try:
            result[name] = [asyncio.run(_load(handle, vectors, clients, args.requests)) for clients in (1, 32)]
        finally:
            serve.delete("gpu-bench")
    serve.shutdown()  # on a shared cluster, Serve (its proxy's port) must not outlive the bench
    return result


def section_precision(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Validation MRR of the same run (data, seed) in fp32, TF32 and bf16."""
    from cube.config import load_config
    from cube.job_config import TrainConfig
    from jobs.trainer import train

    if args.quick:  # the CPU check: that bf16 runs through Ray Train, which the train section's run did
        run = work / "train"
        report = json.loads((run / "eval.json").read_text())
        best = json.loads((run / "model" / "config.json").read_text())["val"]["mrr"]
        return {"bf16": {"val_mrr": best, "test_mrr": report["cube"]["mrr"], "run": "the train section's"}}
    result = {}
    for name, sets in (("fp32", ["optim.precision=fp32", "optim.tf32=off"]),
                       ("tf32", ["optim.precision=fp32", "optim.tf32=on"]), ("bf16", ["optim.precision=bf16"])):
        if name == "tf32" and args.device != "cuda":
            continue  # TF32 is a mode of CUDA's tensor cores
        cfg = load_config(TrainConfig, None, train_config(args, *sets))
        report = train(args.data, work / f"precision-{name}", cfg)
        best = json.loads((work / f"precision-{name}" / "model" / "config.json").read_text())["val"]["mrr"]
        result[name] = {"val_mrr": best, "test_mrr": report["cube"]["mrr"]}
    return result


SECTIONS = {"train": section_train, "ingest": section_ingest, "tune": section_tune, "serve": section_serve,
            "precision": section_precision}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="Parquet pairs that carry their embeddings")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="a tiny cube and few trials: the CPU check of the script")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--section-s", type=float, default=600, help="time limit of a section's subprocesses")
    p.add_argument("--port", type=int, default=8124)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, help="scratch folder (default OUT/work, removed at the end)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here; use --device cpu")
    from jobs.common import ensure_ray, setup_logging

    setup_logging()
    ensure_ray()
    work = args.work or args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {"device": args.device, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    save(args.out, "env", env)
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            result = SECTIONS[name](args, work)
        except Exception as e:  # a failed section is recorded and the next one runs
            result = {"error": f"{type(e).__name__}: {e}"}
        result["section_seconds"] = round(time.perf_counter() - t0, 1)
        save(args.out, name, result)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
