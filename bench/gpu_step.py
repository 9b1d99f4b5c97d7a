"""Samples/s of one cube training step on one GPU: the project's eager step, the graphed fast
path (cube/train/graph_step.py) and the JAX peer (bench/jax_cube.py), side by side in one process.

    python -m bench.gpu_step                                # one GPU; batch 32, 256, 1024
    python -m bench.gpu_step --device cpu --tiny --batches 4 8 --budget 0.2   # smoke test

The cube is the default CubeConfig (15×15×11, C=8, hidden 32, k=4, T=12, fire 0.75) with
E=576, the loss is LossConfig(), the optimiser OptimConfig()'s AdamW. Step jitter is off
unless --jitter: every row then runs exactly T=12 steps (the JAX peer compiles one program
per T, the graphed step captures one graph per T; both pick T the same way with --jitter).

Each cell is samples/s and, in brackets, counted FLOP/s (bench.cube_flops.step_flops) over a
square matmul's rate measured in the same run: the TF32 (or strict fp32) matmul for fp32 rows,
bf16 for bf16 rows. Rows of one batch size run in interleaved rounds of --budget/--rounds
seconds each, after warm-up (capture, compilation), and the best round counts; each round
builds every row's step anew, one row at a time (their memory pools would not fit together).

Backend flags, per row: "eager" is the project's step as it runs today (torch defaults:
cuDNN heuristics, TF32 convs, fp32 matmuls); "graphed" rows use cube.train.graph_step.fast_backends
(cuDNN autotuning; TF32 convs and matmuls unless --no-tf32); JAX uses its defaults (TF32 for
fp32 convs and dots on GPUs) or, with --no-tf32, "highest" precision.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX is imported: share the GPU with torch

import torch

from bench.cube_flops import matmul_rate, step_flops
from cube.model import KERNELS, CellularCube, CubeConfig
from cube.train.graph_step import GraphedCubeStep, fast_backends
from cube.train.loop import train_epoch
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, make_optimizer

EMBED = 576
TINY = CubeConfig(width=5, height=5, depth=4, channels=4, hidden=8, io_channels=2, steps=3)
LONG_RUN = 10**6  # steps_per_epoch for the LR schedule: the rate stays near its warm-up start


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # eager | graphed | compiled | jax
    precision: str  # fp32 | bf16
    kernel: str = "conv3d"  # the lattice conv (cube.model.KERNELS); the JAX peer always runs its conv3d


def _project_rows() -> list[Row]:
    rows = [Row(f"eager {p}", "eager", p) for p in ("fp32", "bf16")]
    for kind, label in (("graphed", "graphed"), ("compiled", "graphed+compile")):
        rows += [Row(f"{label} {k} {p}", kind, p, k) for k in KERNELS for p in ("fp32", "bf16")]
    return rows


ROWS = _project_rows() + [Row("jax fp32", "jax", "fp32"), Row("jax bf16 convs", "jax", "bf16")]


@dataclass
class Bench:
    device: str
    cfg: CubeConfig
    tf32: bool
    data: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def batches(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Four fixed random batches per size, rotated, on the device."""
        if batch not in self.data:
            g = torch.Generator().manual_seed(batch)
            self.data[batch] = [(torch.randn(batch, EMBED, generator=g).to(self.device),
                                 torch.randn(batch, EMBED, generator=g).to(self.device)) for _ in range(4)]
        return self.data[batch]

    def model(self) -> CellularCube:
        torch.manual_seed(0)
        return CellularCube(self.cfg, EMBED).to(self.device, memory_format=torch.channels_last_3d)

    def set_flags(self, row: Row) -> None:
        """Row's backend flags (see the module docstring); a no-op on CPU."""
        if self.device != "cuda":
            return
        if row.kind == "eager":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = False
        else:
            fast_backends(tf32=self.tf32)

    def runner(self, row: Row, batch: int) -> Callable[[int], None]:
        """A function that runs n training steps of `row` and waits for the device."""
        optim = OptimConfig(epochs=1, batch_size=batch, precision=row.precision)
        data = self.batches(batch)
        if row.kind == "eager":
            model = self.model()
            opt, sched = make_optimizer(model, optim, LONG_RUN)

            def run(n: int) -> None:
                train_epoch(model, itertools.islice(itertools.cycle(data), n), opt, sched, LossConfig(), optim)
            return run
        if row.kind in ("graphed", "compiled"):
            step = GraphedCubeStep(self.model(), LossConfig(), optim, batch, LONG_RUN, kernel=row.kernel,
                                   capture=self.device == "cuda", compile_step=row.kind == "compiled")
            counter = itertools.count()

            def run(n: int) -> None:
                for _ in range(n):
                    step.step(*data[next(counter) % len(data)])
                self.sync()
            return run
        return self.jax_runner(row, batch, optim, data)

    def jax_runner(self, row: Row, batch: int, optim: OptimConfig, data) -> Callable[[int], None]:
        import jax
        import jax.numpy as jnp

        from bench.jax_cube import JaxCubeStep

        if self.device == "cuda" and jax.default_backend() != "gpu":
            raise RuntimeError(f"JAX runs on {jax.default_backend()}, not the GPU: its rows would not be comparable")
        if not self.tf32:
            jax.config.update("jax_default_matmul_precision", "highest")
        step = JaxCubeStep.build(self.model(), LossConfig(), optim, LONG_RUN, conv_dtype=row.precision)
        jdata = [(jnp.asarray(q.cpu().numpy()), jnp.asarray(a.cpu().numpy())) for q, a in data]
        counter = itertools.count()

        def run(n: int) -> None:
            for _ in range(n):
                step.step(*jdata[next(counter) % len(jdata)])
            step.terms.block_until_ready()
        return run


def timed(run: Callable[[int], None], budget: float, step_s: float) -> float:
    """Steps/s over `budget` seconds, in chunks of ~50 ms between device syncs."""
    chunk = max(1, int(0.05 / max(step_s, 1e-6)))
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        run(chunk)
        n += chunk
    return n / (time.perf_counter() - start)


def measure_column(bench: Bench, rows: list[Row], batch: int, budget: float, rounds: int) -> dict[str, float | str]:
    """Samples/s per row at one batch size (best of `rounds` passes over the rows), or the error
    text. One row's step lives at a time: at batch 1024 a graphed step's memory pool holds
    12 steps of activations (GiBs), and several of them alive at once ran the card out of memory
    during a capture, which also broke every later capture in the process."""
    best: dict[str, float] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for row in rows:
            if row.name in failed:
                continue
            bench.set_flags(row)
            if bench.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                run = bench.runner(row, batch)
                run(2)  # capture / compile / autotune
                start = time.perf_counter()
                run(2)
                rate = timed(run, budget / rounds, (time.perf_counter() - start) / 2) * batch
                best[row.name] = max(best.get(row.name, 0.0), rate)
                memory = (
                    f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated"
                    if bench.device == "cuda"
                    else ""
                )
                print(f"  batch {batch} {row.name}: {rate:,.0f} samples/s{memory}", flush=True)
            except Exception as e:  # reported in the table, never dropped
                failed[row.name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                print(f"  batch {batch} {row.name}: {failed[row.name]}", flush=True)
            finally:
                run = None
                gc.collect()
                if bench.device == "cuda":
                    torch.cuda.empty_cache()
    return {**best, **failed}


def mean_flops(cfg: CubeConfig, batch: int, jitter: bool) -> float:
    counts = range(cfg.steps, cfg.steps + (cfg.steps_jitter if jitter else 0) + 1)
    return sum(step_flops(replace(cfg, steps=t), EMBED, batch) for t in counts) / len(counts)


def table(results: dict[int, dict], rows: list[Row], peaks: dict[str, float], cfg: CubeConfig, jitter: bool) -> str:
    batches = sorted(results)
    lines = [f"{'samples/s (FLOP/s / matmul peak)':<24}" + "".join(f"{'batch ' + str(b):>22}" for b in batches)]
    for row in rows:
        cells = []
        for b in batches:
            v = results[b].get(row.name)
            if isinstance(v, float):
                frac = v / b * mean_flops(cfg, b, jitter) / peaks[row.precision]
                cells.append(f"{v:>12,.0f} ({frac:6.1%})")
            else:
                cells.append("failed" if v else "-")
        lines.append(f"{row.name:<24}" + "".join(f"{c:>22}" for c in cells))
    for precision in ("fp32", "bf16"):
        cells = []
        for b in batches:
            ours = [
                v
                for r in rows
                if r.kind != "jax" and r.precision == precision and isinstance(v := results[b].get(r.name), float)
            ]
            jax_ = [
                v
                for r in rows
                if r.kind == "jax" and r.precision == precision and isinstance(v := results[b].get(r.name), float)
            ]
            cells.append(f"{max(ours) / max(jax_):.2f}x" if ours and jax_ else "-")
        lines.append(f"{'best ' + precision + ' / jax':<24}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024])
    p.add_argument("--budget", type=float, default=2.0, help="timed seconds per cell, split over the rounds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rows", nargs="+", default=[r.name for r in ROWS], choices=[r.name for r in ROWS], metavar="ROW",
                   help=f"rows to run, of: {', '.join(repr(r.name) for r in ROWS)}")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS, help="lattice conv kernels to run")
    p.add_argument("--no-compile", action="store_true", help="leave out the graphed+compile rows")
    p.add_argument("--no-jax", action="store_true", help="leave out the JAX rows")
    p.add_argument("--jitter", action="store_true", help="train with the default step jitter (T = 12..16)")
    p.add_argument("--no-tf32", action="store_true", help="strict fp32 for the graphed and JAX rows")
    p.add_argument("--tiny", action="store_true", help="a 5×5×4 cube (smoke test)")
    p.add_argument("--deadline", type=float, default=0, help="skip the batch sizes not started after this many seconds")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; use --device cpu for a smoke test")
    t0 = time.perf_counter()
    # Every compiled row compiles the one lattice_step function anew (new model, shape, dtype);
    # dynamo's default limit of 8 versions per function would stop the table part-way.
    torch._dynamo.config.recompile_limit = 64
    cfg = replace(TINY if args.tiny else CubeConfig(), **({} if args.jitter else {"steps_jitter": 0}))
    rows = [
        r
        for r in ROWS
        if r.name in args.rows
        and (r.kind == "jax" or r.kernel in args.kernels)
        and not (args.no_compile and r.kind == "compiled")
        and not (args.no_jax and r.kind == "jax")
        and not (args.device == "cpu" and r.kind == "compiled")
    ]
    bench = Bench(args.device, cfg, tf32=not args.no_tf32)
    bench.set_flags(Row("", "graphed", "fp32"))  # the matmul peaks at the fast path's precision
    gpu = args.device == "cuda"
    peaks = {"fp32": matmul_rate(args.device, torch.float32, 8192 if gpu else 512, 1.0),
             "bf16": matmul_rate(args.device, torch.bfloat16, 8192 if gpu else 256, 1.0)}
    name = torch.cuda.get_device_name() if gpu else "cpu"
    print(
        f"{name}, torch {torch.__version__}; cube {cfg.width}x{cfg.height}x{cfg.depth} C={cfg.channels} "
        f"hidden={cfg.hidden} T={cfg.steps}{f'+U{{0..{cfg.steps_jitter}}}' if args.jitter else ''} "
        f"fire={cfg.fire_rate} E={EMBED}; graphed/jax fp32 = {'TF32' if bench.tf32 and gpu else 'strict fp32'}; "
        f"matmul peaks: {'tf32' if bench.tf32 and gpu else 'fp32'} {peaks['fp32'] / 1e12:.1f}, bf16 "
        f"{peaks['bf16'] / 1e12:.1f} TFLOP/s",
        flush=True,
    )
    results: dict[int, dict] = {}
    for batch in args.batches:
        if args.deadline and time.perf_counter() - t0 > args.deadline:
            print(f"batch {batch}: skipped, past the {args.deadline:.0f} s deadline", flush=True)
            continue
        results[batch] = measure_column(bench, rows, batch, args.budget, args.rounds)
        print(
            f"batch {batch} done at {time.perf_counter() - t0:.0f} s\n{table(results, rows, peaks, cfg, args.jitter)}",
            flush=True,
        )
    if gpu:
        print(f"peak GPU memory allocated by torch {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "tf32": bench.tf32, "jitter": args.jitter,
                       "peaks": peaks, "samples_per_s": {str(b): r for b, r in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
