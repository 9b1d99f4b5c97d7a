"""The data plane at scale: `cube train` on synthetic pairs that carry their own embeddings, with
the memory of the driver, the Train workers and the whole machine sampled all along.

    python -m bench.data_scale make --rows 2000000 --dim 384 --out /data/pairs-2m.parquet
    python -m bench.data_scale train --data /data/pairs-2m.parquet --output /data/run-2m \\
        --report docs/results/data_scale/2m.json

`make` writes one Parquet file (row groups of 64k rows) of questions, answers and their
`question_embedding` / `answer_embedding` columns: a question is a random unit vector, its
answer the question plus a rank-8 correction and noise, so that identity retrieval is imperfect
and a model can learn the rest. It streams: memory is one row group.

`train` starts its own Ray cluster (`ray start --head --num-cpus=4 --object-store-memory=1.5e9`:
four logical CPUs on two cores, so that Ray Data's readers have room beside two training
workers), samples the machine's used memory (MemTotal − MemAvailable) once Ray is idle, runs
`cube train` with the tiny cube of the acceptance test against it, and samples every second:
the machine's used memory, the driver's and every Ray worker's resident and unique memory.
It prints and writes the peaks, the rise above idle, the job's time and its eval.json summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["cube.width=4", "cube.height=4", "cube.depth=3", "cube.steps=3", "cube.steps_jitter=0", "cube.channels=4",
        "cube.hidden=8", "cube.io_channels=2", "optim.epochs=1", "baselines=identity,ridge"]


def make(rows: int, dim: int, out: Path, seed: int = 0, group: int = 65_536) -> None:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(dim, 8)).astype(np.float32) / np.sqrt(dim)
    v = rng.normal(size=(8, dim)).astype(np.float32)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = None
    for start in range(0, rows, group):
        n = min(group, rows - start)
        q = rng.normal(size=(n, dim)).astype(np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        a = q + 1.5 * (q @ u) @ v + 0.3 * rng.normal(size=(n, dim)).astype(np.float32) / np.sqrt(dim)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        ids = np.arange(start, start + n)
        table = pa.table({
            "question": [f"question {i}: what does item {i} of the synthetic corpus say?" for i in ids],
            "answer": [f"answer {i}: item {i} says what its vector says." for i in ids],
            "question_embedding": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), dim),
            "answer_embedding": pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), dim)})
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=group)
    assert writer is not None
    writer.close()
    os.replace(tmp, out)
    print(f"{out}: {rows:,} pairs of {dim}-D vectors, {out.stat().st_size / 2**30:.2f} GiB")


def used_memory() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kib = lambda k: int(info[k].split()[0]) * 1024  # noqa: E731
    return kib("MemTotal") - kib("MemAvailable")


class Sampler(threading.Thread):
    """Peaks, every `every` seconds: machine used memory, the driver's tree, each Ray worker."""

    def __init__(self, driver_pid: int, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.driver_pid, self.every = driver_pid, every
        self.stop = threading.Event()
        self.peak = {"machine_used": 0, "driver_rss": 0, "driver_uss": 0, "worker_rss": 0, "worker_uss": 0,
                     "ray_processes_rss_sum": 0}
        self.workers: dict[str, int] = {}
        self.series: list[dict] = []  # one row a sample: time, machine used, USS by process title

    def run(self) -> None:
        import psutil

        while not self.stop.wait(self.every):
            self.peak["machine_used"] = max(self.peak["machine_used"], used_memory())
            try:
                driver = psutil.Process(self.driver_pid)
                mem = driver.memory_full_info()
                self.peak["driver_rss"] = max(self.peak["driver_rss"], mem.rss)
                self.peak["driver_uss"] = max(self.peak["driver_uss"], mem.uss)
            except psutil.Error:
                pass
            rss_sum = 0
            row: dict = {"t": time.time(), "machine_used": used_memory()}
            try:
                row["driver"] = psutil.Process(self.driver_pid).memory_full_info().uss
            except psutil.Error:
                pass
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    title = " ".join(proc.info["cmdline"] or [])
                    if not title.startswith("ray::"):
                        continue
                    mem = proc.memory_full_info()
                    rss_sum += mem.rss
                    name = title.split()[0]
                    self.workers[name] = max(self.workers.get(name, 0), mem.uss)
                    row[name] = row.get(name, 0) + mem.uss
                    if "RayTrainWorker" in name:
                        self.peak["worker_rss"] = max(self.peak["worker_rss"], mem.rss)
                        self.peak["worker_uss"] = max(self.peak["worker_uss"], mem.uss)
                except psutil.Error:
                    continue
            self.peak["ray_processes_rss_sum"] = max(self.peak["ray_processes_rss_sum"], rss_sum)
            self.series.append(row)


def run_train(data: Path, output: Path, report: Path | None, extra: list[str]) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = Path(tempfile.mkdtemp(prefix="cube-bench-ray-"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=4",
                    "--object-store-memory=1500000000", f"--temp-dir={temp}", "--disable-usage-stats",
                    "--include-dashboard=true"], env=env, check=True, capture_output=True)
    try:
        time.sleep(10)  # Ray idle: its own processes up and settled
        idle = used_memory()
        cmd = [sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--output", str(output),
               *[a for o in TINY + extra for a in ("--set", o)]]
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        out, err = proc.communicate()
        sampler.stop.set()
        sampler.join()
        took = time.time() - start
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
    result = {"data": str(data), "rows": pq.ParquetFile(data).metadata.num_rows, "returncode": proc.returncode,
              "seconds": round(took), "idle_used_gib": idle / 2**30,
              "peak_used_gib": sampler.peak["machine_used"] / 2**30,
              "rise_gib": (sampler.peak["machine_used"] - idle) / 2**30,
              **{f"{k}_gib": v / 2**30 for k, v in sampler.peak.items() if k != "machine_used"},
              "largest_ray_processes_uss_gib": {k: round(v / 2**30, 2) for k, v in
                                                sorted(sampler.workers.items(), key=lambda kv: -kv[1])[:6]}}
    if proc.returncode == 0:
        ev = json.loads((output / "eval.json").read_text())
        result["eval"] = {"cube_mrr": ev["cube"]["mrr"], "identity_mrr": ev["baselines"]["identity"]["mrr"],
                          "best_baseline": ev["best_baseline"],
                          "best_mrr": ev["baselines"][ev["best_baseline"]]["mrr"],
                          "finite": all(np.isfinite(v) for v in ev["cube"].values()),
                          "questions": ev["n_questions"], "pool": ev["pool_size"]}
    else:
        result["stderr_tail"] = err[-3000:]
    print(json.dumps(result, indent=1))
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result, indent=1) + "\n")
        import pandas as pd

        series = pd.DataFrame(sampler.series).fillna(0)
        series["t"] -= start
        series.to_csv(report.with_suffix(".memory.csv"), index=False)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("make")
    m.add_argument("--rows", type=int, required=True)
    m.add_argument("--dim", type=int, default=384)
    m.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", type=Path, required=True)
    t.add_argument("--output", type=Path, required=True)
    t.add_argument("--report", type=Path)
    t.add_argument("--set", dest="extra", action="append", default=[])
    args = p.parse_args()
    if args.what == "make":
        make(args.rows, args.dim, args.out)
    else:
        run_train(args.data, args.output, args.report, args.extra)


if __name__ == "__main__":
    main()
