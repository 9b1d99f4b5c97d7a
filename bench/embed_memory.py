"""Stress: 10,000 embeddings in one process; resident memory must not grow after warm-up.

    python -m bench.embed_memory --rows 10000 --teacher minilm

Samples RSS after every batch and fits a line to the samples after warm-up (the first 20%).
A leak shows as a positive slope; the figure printed is MiB per 1,000 rows.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from bench.embed_throughput import texts
from cube.teachers import HFTeacher, TeacherConfig


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher", default="minilm")
    args = p.parse_args()
    teacher = HFTeacher(TeacherConfig(name=args.teacher))
    rows = texts(args.rows)
    done, samples = [], []
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        teacher.embed(rows[i : i + args.batch_size])
        done.append(min(i + args.batch_size, len(rows)))
        samples.append(rss_mib())
    elapsed = time.perf_counter() - start
    warm = len(samples) // 5
    slope, _ = np.polyfit(np.array(done[warm:]) / 1000.0, np.array(samples[warm:]), 1)
    print(f"rows={args.rows} teacher={args.teacher} {args.rows / elapsed:.0f} rows/s")
    print(f"RSS after warm-up {samples[warm]:.0f} MiB, at end {samples[-1]:.0f} MiB, peak {max(samples):.0f} MiB")
    print(f"slope after warm-up: {slope:+.3f} MiB per 1,000 rows (a leak would be clearly positive)")


if __name__ == "__main__":
    main()
