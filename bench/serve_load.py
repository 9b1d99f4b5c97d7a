"""Load on the Serve app over loopback: latency percentiles and throughput, batched vs unbatched,
HTTP vs an in-process call of the same pipeline, measured side by side in one run.

    python -m bench.serve_load --run RUN_DIR [--requests 200] [--seconds 30] [--concurrency 1 8 32]

1. in-process: `serve.pipeline.InProcessPipeline` (teacher → cube → bank, the functions the
   deployments call), one question at a time, one torch thread (as each replica has);
2. HTTP, batched: the app with its default settings (@serve.batch up to 32), POST /v1/answer
   from `concurrency` closed-loop clients (aiohttp, one event loop);
3. HTTP, unbatched: the same app redeployed with max_batch_size 1 for the teacher and the cube.

Each level stops after --requests requests or --seconds seconds, whichever comes first, after a
short warm-up. Besides client-side percentiles it prints medians of where the time went (from
each answer's timings_ms): the teacher's and the cube's compute for the batch the request ran in,
the time inside the API (the rest of the latency is the proxy and HTTP), and the teacher's batch
size. Questions are the run's held-out ones, cycled. The machine is noisy: compare the
ratios printed at the end, which come from the same run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.common import ensure_ray, setup_logging


@dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # medians of where the time went: the teacher's and the cube's compute (of the batch the
    # request ran in), and, over HTTP, the time inside the API (the rest is proxy + HTTP)
    teacher_ms: float
    cube_ms: float
    api_ms: float | None
    teacher_batch: float | None


def summarise(mode: str, concurrency: int, latencies: list[float], errors: int, seconds: float,
              stages: list[dict[str, float]]) -> Level:
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])

    def median(key: str) -> float | None:
        values = [x[key] for x in stages if key in x]
        return round(float(np.median(values)), 2) if values else None

    return Level(mode, concurrency, len(latencies), errors, round(seconds, 2), round(len(latencies) / seconds, 2),
                 round(float(p50), 2), round(float(p95), 2), round(float(p99), 2), median("teacher"), median("cube"),
                 median("total"), median("batch"))


def questions_of(run: Path) -> list[str]:
    from cube.data.rundir import RunDir

    return RunDir(run).split().table("test", ["question"]).column("question").to_pylist()


def in_process(run: Path, questions: list[str], requests: int, seconds: float, warmup: int) -> Level:
    from serve.pipeline import InProcessPipeline

    torch.set_num_threads(1)
    pipeline = InProcessPipeline(run)
    for q in questions[:warmup]:
        pipeline.answer([q])
    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    start = time.perf_counter()
    while len(latencies) < requests and time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        result = pipeline.answer([questions[len(latencies) % len(questions)]])[0]
        latencies.append(time.perf_counter() - t0)
        cube = result["timings"]["cube"]
        stages.append({"cube": cube, "teacher": latencies[-1] * 1e3 - cube - result["timings"]["search"]})
    return summarise("in-process", 1, latencies, 0, time.perf_counter() - start, stages)


async def http_level(url: str, mode: str, questions: list[str], concurrency: int, requests: int, seconds: float,
                     warmup: int) -> Level:
    import aiohttp

    latencies: list[float] = []
    stages: list[dict[str, float]] = []
    errors = 0
    issued = 0
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def ask(q: str) -> dict | None:
            async with session.post(f"{url}/v1/answer", json={"question": q}) as r:
                body = await r.read()
                return json.loads(body) if r.status == 200 else None

        await asyncio.gather(*(ask(q) for q in questions[:warmup]))
        start = time.perf_counter()

        async def client() -> None:
            nonlocal issued, errors
            while issued < requests and time.perf_counter() - start < seconds:
                q = questions[issued % len(questions)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    body = await ask(q)
                except aiohttp.ClientError:
                    body = None
                if body:
                    latencies.append(time.perf_counter() - t0)
                    stages.append({**body["timings_ms"], "batch": body["batch_sizes"]["teacher"]})
                else:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return summarise(mode, concurrency, latencies, errors, time.perf_counter() - start, stages)


def deploy(run: Path, batched: bool) -> None:
    from ray import serve

    from serve.app import build_app

    settings = {} if batched else {"embedder": {"max_batch_size": 1}, "predictor": {"max_batch_size": 1}}
    serve.run(build_app({"run_dir": str(run), "settings": settings}), name="cube", route_prefix="/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(levels: list[Level]) -> str:
    def opt(v: float | None) -> str:
        return f"{v:>9.1f}" if v is not None else f"{'-':>9}"

    lines = [f"{'mode':<16}{'conc':>5}{'reqs':>6}{'errs':>6}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
             f"{'teacher':>9}{'cube':>9}{'in API':>9}{'t.batch':>8}"]
    lines += [
        f"{x.mode:<16}{x.concurrency:>5}{x.requests:>6}{x.errors:>6}{x.rps:>9.1f}{x.p50_ms:>9.1f}{x.p95_ms:>9.1f}"
        f"{x.p99_ms:>9.1f}{opt(x.teacher_ms)}{opt(x.cube_ms)}{opt(x.api_ms)}{x.teacher_batch or 1:>8.1f}"
        for x in levels
    ]
    return "\n".join(lines)


def find(levels: list[Level], mode: str, concurrency: int) -> Level | None:
    return next((x for x in levels if x.mode == mode and x.concurrency == concurrency), None)


def ratios(levels: list[Level]) -> list[str]:
    out = []
    local, http1 = find(levels, "in-process", 1), find(levels, "http batched", 1)
    if local and http1:
        out.append(f"HTTP p50 / in-process p50 at concurrency 1: {http1.p50_ms / local.p50_ms:.2f}x (target <= 1.5x)")
    top = max(x.concurrency for x in levels)
    batched, unbatched = find(levels, "http batched", top), find(levels, "http unbatched", top)
    if batched and unbatched:
        out.append(
            f"batched / unbatched throughput at concurrency {top}: {batched.rps / unbatched.rps:.2f}x (target >= 3x)"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder written by `cube train`")
    p.add_argument("--requests", type=int, default=200, help="at most this many requests per level")
    p.add_argument("--seconds", type=float, default=30.0, help="at most this long per level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--json", type=Path, help="also write the levels here")
    args = p.parse_args()
    setup_logging(False)
    from ray import serve

    questions = questions_of(args.run)
    levels = [in_process(args.run, questions, args.requests, args.seconds, args.warmup)]
    ensure_ray()
    port = args.port or free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        for batched in (True, False):
            deploy(args.run, batched)
            mode = "http batched" if batched else "http unbatched"
            for c in args.concurrency:
                levels.append(
                    asyncio.run(http_level(url, mode, questions, c, args.requests, args.seconds, args.warmup))
                )
                print(table(levels[-1:]).splitlines()[-1], flush=True)
    finally:
        serve.shutdown()
    print(f"\nrun {args.run}, {args.requests} requests or {args.seconds:g} s per level, "
          f"{torch.get_num_threads()} torch thread(s) in process\n")
    print(table(levels))
    for line in ratios(levels):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(x) for x in levels], indent=2))


if __name__ == "__main__":
    main()
