"""Where one training step's GPU time goes: the device kernels of an eager step, by total time.

    python -m bench.gpu_profile --batch 1024 --kernel conv2d --precision bf16
    python -m bench.gpu_profile --device cpu --tiny --batch 4      # smoke test, no GPU

The eager step launches the same kernels that the graphed step replays (a CUDA graph hides
them from the profiler), so its table says which kernels the fast path spends its time in.
Default cube, E=576, T=12 without jitter, as bench/gpu_step.py; `--compile` profiles the
torch.compile'd lattice step instead (eager elsewhere).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from bench.gpu_step import EMBED, LONG_RUN, TINY
from cube.model import KERNELS, CellularCube, CubeConfig
from cube.train.graph_step import GraphedCubeStep, fast_backends
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--kernel", default="conv3d", choices=KERNELS)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd lattice step")
    p.add_argument("--steps", type=int, default=3, help="training steps profiled")
    p.add_argument("--top", type=int, default=14, help="kernels listed")
    p.add_argument("--tiny", action="store_true", help="a 5x5x4 cube (smoke test)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; use --device cpu for a smoke test")
    cfg = replace(TINY if args.tiny else CubeConfig(), steps_jitter=0)
    if args.device == "cuda":
        fast_backends()
    torch.manual_seed(0)
    model = CellularCube(cfg, EMBED).to(args.device)
    optim = OptimConfig(epochs=1, batch_size=args.batch, precision=args.precision)
    step = GraphedCubeStep(model, LossConfig(), optim, args.batch, LONG_RUN, kernel=args.kernel, capture=False,
                           compile_step=args.compile)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(args.batch, EMBED, generator=g).to(args.device),
             torch.randn(args.batch, EMBED, generator=g).to(args.device)) for _ in range(2)]
    batches = itertools.cycle(data)
    for _ in range(3):  # cuDNN autotuning, compilation, lazy AdamW state
        step.step(*next(batches))
    if args.device == "cuda":
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if args.device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(args.steps):
            step.step(*next(batches))
        if args.device == "cuda":
            torch.cuda.synchronize()
    events = [
        e for e in prof.key_averages() if (e.device_time_total if args.device == "cuda" else e.self_cpu_time_total) > 0
    ]
    time_of = (lambda e: e.device_time_total) if args.device == "cuda" else (lambda e: e.self_cpu_time_total)
    if args.device == "cuda":  # device kernels only: their times add up to the step
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=time_of, reverse=True)
    total = sum(time_of(e) for e in events)
    print(f"{args.kernel} {args.precision}{' compiled' if args.compile else ''} batch {args.batch}: "
          f"{total / args.steps / 1e3:.2f} ms of {'GPU' if args.device == 'cuda' else 'CPU'} time per training step, "
          f"{sum(e.count for e in events) // args.steps} kernels per step")
    for e in events[: args.top]:
        print(
            f"  {time_of(e) / total:6.1%} {time_of(e) / args.steps / 1e3:8.3f} ms {e.count // args.steps:5d}x  "
            f"{e.key[:90]}"
        )


if __name__ == "__main__":
    main()
