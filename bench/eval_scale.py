"""Evaluation time and memory against pool size: exact ranking in blocks (cube.eval.metrics).

    python -m bench.eval_scale --pools 10000 100000 1000000 --questions 2000 --dim 384

For each pool: `retrieval_metrics` of `questions` predictions against a pool of random unit
vectors, the seconds it takes and how much this process's memory grew (resident set, sampled
while it ran), beside what one dense N × P score matrix would have taken. Blocked and dense
ranks are checked equal where the dense matrix fits.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil
import torch

from cube.eval.metrics import block_rows, ranks, retrieval_metrics


def peak_growth(fn) -> tuple[float, int]:
    proc = psutil.Process()
    base, peak, stop = proc.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss - base)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    stop.set()
    t.join()
    return took, peak[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pools", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for size in args.pools:
        pool = torch.nn.functional.normalize(torch.randn(size, args.dim, generator=g), dim=-1)
        target = torch.randint(0, size, (args.questions,), generator=g)
        pred = pool[target] + 0.05 * torch.randn(args.questions, args.dim, generator=g)
        took, grew = peak_growth(lambda pred=pred, pool=pool, target=target: retrieval_metrics(pred, pool, target))
        row = {"pool": size, "questions": args.questions, "seconds": round(took, 2),
               "ms_per_1000_questions": round(1000 * took / args.questions * 1000, 1),
               "rss_growth_mib": round(grew / 2**20), "block_rows": block_rows(size),
               "dense_matrix_mib": round(args.questions * size * 4 / 2**20)}
        if args.questions * size <= 2**27:  # dense fits: check the blocked ranks against it
            scores = torch.nn.functional.normalize(pred, dim=-1) @ pool.T
            true = scores.gather(1, target.view(-1, 1))
            row["blocked_equals_dense"] = bool(torch.equal(ranks(pred, pool, target), (scores >= true).sum(1)))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
