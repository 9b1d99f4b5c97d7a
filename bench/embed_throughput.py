"""Ray Data embedding pipeline vs a plain in-process loop: same teacher, batch size and rows.

    python -m bench.embed_throughput --rows 5000 --batch-size 64

Both sides embed the same texts (variants of the shipped questions and answers, so nothing is
cached) one after the other in this process, and the figures are printed side by side with
their ratio: this machine is noisy, so only the ratio is worth comparing across runs.
The pipeline is the product's own `embed_texts` on an embedded local Ray: `--actors` teacher
actors, each reserving `--cpus-per-actor` CPUs and running `--threads-per-actor` torch threads;
the plain loop uses torch's default threads (all cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cube.data.qa import SHIPPED_DATASET, load_qa
from cube.job_config import PipelineOptions
from cube.teachers import HFTeacher, TeacherConfig
from jobs.embedding import embed_texts


def texts(n: int) -> list[str]:
    df = load_qa(SHIPPED_DATASET)
    base = df["question"].tolist() + df["answer"].tolist()
    return [f"{base[i % len(base)]} (variant {i // len(base)})" for i in range(n)]


def plain_loop(rows: list[str], teacher: TeacherConfig, batch_size: int) -> float:
    model = HFTeacher(teacher)
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        model.embed(rows[i : i + batch_size])
    return len(rows) / (time.perf_counter() - start)


def pipeline(rows: list[str], teacher: TeacherConfig, opts: PipelineOptions) -> tuple[float, float]:
    """The product's own path (`embed_texts`: Ray Data, actor pool, Parquet parts).

    Returns (steady-state rows/s, end-to-end rows/s). Steady state runs from the first part
    on disk to the last, so, like the plain loop, it leaves out loading the teacher (here: Ray
    starting the actor process and the model in it); end to end includes that.
    """
    from cube.data import store

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "store"
        start = time.time()
        embed_texts(rows, teacher, opts, folder)
        end = time.time()
        parts = sorted(store.parts(folder), key=lambda p: p.stat().st_mtime)
        first, last = parts[0].stat().st_mtime, parts[-1].stat().st_mtime
        after_first = sum(pq.ParquetFile(p).metadata.num_rows for p in parts[1:])
        assert len(store.keys(folder)) == len(set(rows))
    return after_first / (last - first), len(rows) / (end - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs each actor reserves from Ray")
    p.add_argument(
        "--threads-per-actor", type=int, default=0, help="torch threads per actor (0 = auto, as in cube embed)"
    )
    args = p.parse_args()
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows = texts(args.rows)
    teacher = TeacherConfig(name=args.teacher)
    loop = plain_loop(rows, teacher, args.batch_size)
    opts = PipelineOptions(concurrency=args.actors, batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
                           threads_per_actor=args.threads_per_actor)
    steady, end_to_end = pipeline(rows, teacher, opts)
    print(f"rows={args.rows} batch={args.batch_size} teacher={args.teacher} loop_threads={torch.get_num_threads()} "
          f"actors={args.actors} x ({args.cpus_per_actor} CPU, {opts.threads()} threads)")
    print(f"plain loop                  {loop:8.1f} rows/s")
    print(f"Ray Data, steady state      {steady:8.1f} rows/s   ratio to loop {steady / loop:.2f}  (target >= 0.9)")
    print(f"Ray Data, incl. actor start {end_to_end:8.1f} rows/s   ratio to loop {end_to_end / loop:.2f}")


if __name__ == "__main__":
    main()
