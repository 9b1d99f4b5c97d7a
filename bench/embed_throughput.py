"""Ray Data embedding pipeline vs a plain in-process loop: same teacher, batch size and rows.

    python -m bench.embed_throughput --rows 5000 --batch-size 64

Both sides embed the same texts (variants of the shipped questions and answers, so nothing is
cached) one after the other in this process, and the figures are printed side by side with
their ratio: this machine is noisy, so only the ratio is worth comparing across runs.
The pipeline runs on an embedded local Ray with `--actors` teacher actors of `--cpus-per-actor`
CPUs each; the plain loop uses torch's default threads.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cube.config import to_dict
from cube.data import SHIPPED_DATASET, load_qa
from cube.teacher import Teacher, TeacherConfig


def texts(n: int) -> list[str]:
    df = load_qa(SHIPPED_DATASET)
    base = df["question"].tolist() + df["answer"].tolist()
    return [f"{base[i % len(base)]} (variant {i // len(base)})" for i in range(n)]


def plain_loop(rows: list[str], teacher: TeacherConfig, batch_size: int) -> float:
    model = Teacher(teacher)
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        model.embed(rows[i : i + batch_size])
    return len(rows) / (time.perf_counter() - start)


def pipeline(rows: list[str], teacher: TeacherConfig, batch_size: int, actors: int, cpus: float) -> float:
    import ray
    import ray.data

    from cube import store
    from cube.data import text_id
    from jobs.embed import PartSink, TeacherActor, store_table

    with tempfile.TemporaryDirectory() as d:
        folder = store.open_store(Path(d), teacher.identity())
        ds = ray.data.from_items([{"id": text_id(t), "text": t} for t in rows], override_num_blocks=max(1, len(rows) // (batch_size * 4)))
        ds = ds.map_batches(TeacherActor, fn_constructor_kwargs={"teacher": to_dict(teacher), "device": "cpu"},
                            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus)
        # Teacher load time is excluded on both sides: warm the pool on one batch first.
        ds.limit(batch_size).materialize()
        start = time.perf_counter()
        ds.write_datasink(PartSink(folder, store_table(teacher.identity())))
        elapsed = time.perf_counter() - start
        assert len(store.existing_ids(folder)) == len(rows)
    return len(rows) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=2.0)
    args = p.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = texts(args.rows)
    teacher = TeacherConfig(name=args.teacher)
    loop = plain_loop(rows, teacher, args.batch_size)
    piped = pipeline(rows, teacher, args.batch_size, args.actors, args.cpus_per_actor)
    print(f"rows={args.rows} batch={args.batch_size} teacher={args.teacher} torch_threads={torch.get_num_threads()} "
          f"actors={args.actors}x{args.cpus_per_actor}cpu")
    print(f"plain loop      {loop:8.1f} rows/s")
    print(f"Ray Data        {piped:8.1f} rows/s")
    print(f"ratio pipeline/loop = {piped / loop:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
