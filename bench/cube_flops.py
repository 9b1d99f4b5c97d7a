"""Achieved FLOP/s of a cube training step, as a fraction of a plain matmul measured in the same run.

    python -m bench.cube_flops                    # CPU, default cube, batch 32
    python -m bench.cube_flops --device cuda      # GPU (no Ray needed)

FLOPs are counted, not profiled: per cell and step, the fused perception conv
(2·27·C·(hidden+C)) and the update conv (2·hidden·C); plus both adapters; ×3 for
forward+backward. The matmul reference is a square fp32 (and, where the step runs in bf16,
a bf16) product timed in the same process; variants are timed in interleaved rounds and the
best round of each counts, so the ratios are robust to a noisy machine.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from cube.model import KERNELS, CellularCube, CubeConfig
from cube.train.loop import train_epoch
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, make_optimizer


def step_flops(cfg: CubeConfig, embed_dim: int, batch: int) -> float:
    cells = cfg.width * cfg.height * cfg.depth
    per_cell = 2 * 27 * cfg.channels * (cfg.hidden + cfg.channels) + 2 * cfg.hidden * cfg.channels
    lattice = per_cell * cells * cfg.steps
    adapters = 2 * 2 * embed_dim * cfg.io_channels * cfg.face
    return 3.0 * batch * (lattice + adapters)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, n: int, budget_s: float = 1.5) -> float:
    """Best rate over repeated square products within a time budget (the machine's peak, roughly)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best, spent = 0.0, 0.0
    while spent < budget_s:
        sync(device)
        start = time.perf_counter()
        for _ in range(10 if device == "cuda" else 1):
            a @ b
        sync(device)
        took = time.perf_counter() - start
        spent += took
        best = max(best, 2 * n**3 * (10 if device == "cuda" else 1) / took)
    return best


def step_rate(cfg: CubeConfig, device: str, precision: str, batch: int, steps: int, channels_last: bool,
              kernel: str = "conv3d") -> tuple[float, float]:
    torch.manual_seed(0)
    model = CellularCube(cfg, 384).to(device).use_kernel(kernel)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optim = OptimConfig(epochs=1, precision=precision)
    opt, sched = make_optimizer(model, optim, steps_per_epoch=steps + 2)
    data = [(torch.randn(batch, 384, device=device), torch.randn(batch, 384, device=device)) for _ in range(steps)]
    train_epoch(model, data[:2], opt, sched, LossConfig(), optim)  # warm-up
    sync(device)
    start = time.perf_counter()
    train_epoch(model, data, opt, sched, LossConfig(), optim)
    sync(device)
    elapsed = time.perf_counter() - start
    return step_flops(cfg, 384, batch) * steps / elapsed, batch * steps / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed optimiser steps per variant")
    p.add_argument("--hidden", type=int, default=None, help="override the cube's hidden width")
    p.add_argument(
        "--repeats", type=int, default=3, help="rounds over all variants, interleaved; the best round counts"
    )
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="time the bf16 autocast step too (default: on CUDA only; a CPU without bf16 units takes "
                        "minutes per step there)")
    p.add_argument("--kernels", nargs="*", default=["conv2d"], choices=KERNELS,
                   help="lattice kernels timed besides conv3d (channels-last fp32)")
    args = p.parse_args()
    cfg = CubeConfig(fire_rate=1.0, **({"hidden": args.hidden} if args.hidden else {}))
    gpu = args.device == "cuda"
    n = 8192 if gpu else 1024
    fp32_peak = matmul_rate(args.device, torch.float32, n)
    bf16_peak = matmul_rate(args.device, torch.bfloat16, n if gpu else 256)  # CPUs without bf16 units crawl
    print(f"device={args.device} threads={torch.get_num_threads()} cube={cfg.width}x{cfg.height}x{cfg.depth} "
          f"C={cfg.channels} hidden={cfg.hidden} T={cfg.steps} batch={args.batch}")
    print(f"matmul {n}x{n}: fp32 {fp32_peak / 1e9:,.0f} GFLOP/s, bf16 {bf16_peak / 1e9:,.0f} GFLOP/s")
    variants = [("fp32, NCDHW params", "fp32", False, "conv3d"), ("fp32, channels-last", "fp32", True, "conv3d")]
    variants += [(f"fp32, channels-last, {k}", "fp32", True, k) for k in args.kernels if k != "conv3d"]
    if gpu if args.bf16 is None else args.bf16:
        variants.append(("bf16 autocast, channels-last", "bf16", True, "conv3d"))
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):  # interleaved, so a burst of noise hurts one round, not one variant
        for name, precision, cl, kernel in variants:
            rate = step_rate(cfg, args.device, precision, args.batch, args.steps, cl, kernel)
            best[name] = max(best.get(name, rate), rate)
    for name, precision, _, _ in variants:
        flops, samples = best[name]
        ref = bf16_peak if precision == "bf16" else fp32_peak
        print(f"{name:<30} {flops / 1e9:>9,.1f} GFLOP/s  {samples:>8,.1f} samples/s  "
              f"ratio to {'bf16' if precision == 'bf16' else 'fp32'} matmul {flops / ref:.2f}")
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(f"peak memory {peak:,.0f} MiB ({'GPU allocated' if gpu else 'process RSS'})")


if __name__ == "__main__":
    main()
