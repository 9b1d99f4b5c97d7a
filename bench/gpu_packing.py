"""Aggregate samples/s of N cube trainings sharing one GPU, N = 1, 2, 4, 8: which fractional
--gpus-per-trial to give a tuning trial.

    python -m bench.gpu_packing                        # one GPU, 8 s per N
    python -m bench.gpu_packing --device cpu --tiny --procs 1 2 --seconds 2   # smoke test

Each process trains the project's fastest step (cube.train.graph_step.GraphedCubeStep: the default
CubeConfig with its step jitter, E=576, OptimConfig's batch size and precision unless given) on
random data. All processes build and capture first, meet at a barrier, then train for
--seconds; the aggregate is the sum of their samples/s over that common window.

Plain multiprocessing, no Ray (the GPU machine has none): this measures how one GPU shares
itself between CUDA contexts (time-slicing, no MPS), not Ray's placement of trials.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import replace

import torch

from cube.model import KERNELS

EMBED = 576


def train(rank: int, args: argparse.Namespace, barrier, results) -> None:
    """One trial: build, capture, wait for the others, train for args.seconds, report."""
    from cube.model import CellularCube, CubeConfig
    from cube.train.graph_step import GraphedCubeStep, fast_backends
    from cube.train.losses import LossConfig
    from cube.train.optim import OptimConfig

    try:
        cuda = args.device == "cuda"
        if cuda:
            fast_backends()
        cfg = (
            CubeConfig(width=5, height=5, depth=4, channels=4, hidden=8, io_channels=2, steps=3)
            if args.tiny
            else CubeConfig()
        )
        optim = replace(
            OptimConfig(epochs=1), **{k: v for k, v in (("batch_size", args.batch), ("precision", args.precision)) if v}
        )
        torch.manual_seed(rank)
        model = CellularCube(cfg, EMBED).to(args.device)
        step = GraphedCubeStep(model, LossConfig(), optim, optim.batch_size, 10**6, kernel=args.kernel, capture=cuda)
        data = [(torch.randn(optim.batch_size, EMBED, device=args.device),
                 torch.randn(optim.batch_size, EMBED, device=args.device)) for _ in range(4)]
        for i in range(3):  # capture and settle
            step.step(*data[i % 4])
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        barrier.wait(timeout=120)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for _ in range(10):
                step.step(*data[n % 4])
                n += 1
            sync()
        elapsed = time.perf_counter() - start
        results.put((rank, n * optim.batch_size / elapsed, None))
    except Exception as e:  # reported by the parent, never dropped
        barrier.abort()
        results.put((rank, 0.0, f"{type(e).__name__}: {e}"))


def run(n: int, args: argparse.Namespace) -> list[float]:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=train, args=(r, args, barrier, results)) for r in range(n)]
    for p in procs:
        p.start()
    rates, errors = [], []
    deadline = time.monotonic() + 180 + args.seconds
    while len(rates) + len(errors) < n and time.monotonic() < deadline:
        try:
            rank, rate, error = results.get(timeout=2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                errors.append("a process died without reporting")
                break
            continue
        if error:
            errors.append(f"process {rank}: {error}")
        else:
            rates.append(rate)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    if len(rates) < n and not errors:
        errors.append(f"only {len(rates)} of {n} reported within the deadline")
    if errors:
        raise RuntimeError(f"{n} processes: " + "; ".join(errors))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=8.0, help="timed window per N")
    p.add_argument("--batch", type=int, default=None, help="per-process batch (default: OptimConfig's)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: OptimConfig's")
    p.add_argument("--kernel", default="conv3d", choices=KERNELS, help="the lattice conv (cube.model.KERNELS)")
    p.add_argument("--tiny", action="store_true", help="a 5×5×4 cube (smoke test)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; use --device cpu for a smoke test")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"{name}: N processes share it, each GraphedCubeStep (default cube and step jitter, batch "
        f"{args.batch or 'default'}, {args.precision or 'default precision'}), {args.seconds:.0f} s window",
        flush=True,
    )
    print(f"{'N':>3} {'aggregate samples/s':>20} {'per process':>12} {'vs N=1':>7}  gpus-per-trial")
    single = None
    for n in args.procs:
        try:
            rates = run(n, args)
        except Exception as e:
            print(f"{n:>3} FAILED: {e}", flush=True)
            continue
        total = sum(rates)
        single = single or (total if n == 1 else None)
        ratio = f"{total / single:6.2f}x" if single else "      -"
        print(f"{n:>3} {total:>20,.0f} {total / n:>12,.0f} {ratio}  {1 / n:.3g}", flush=True)


if __name__ == "__main__":
    main()
