"""What the sweep's choices cost and buy, measured side by side on one split in one Ray session.

    python -m bench.tune_bench --run runs/x --what asha-fifo tpe-random throughput

- asha-fifo: the same space, trial budget and searcher seed under ASHA and under FIFO; prints the
  trial-epochs each spent and the best validation MRR each found (target: ASHA at most 40% of
  FIFO's epochs for a best MRR within 0.01).
- tpe-random: Optuna TPE against random search; best validation MRR after 10, 20 and 40 trials.
- throughput: trials per hour at 1, 2 and 4 trials at once (FIFO, fixed-size trials).

--run is any `cube train` run folder: the sweeps read its split and teacher where they are.
Small cubes keep it to minutes on a 2-core laptop; the space is bench/tune_bench_space.yaml.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cube.config import load_config, save_config, to_dict
from cube.data.rundir import RunDir
from cube.data.storage import Storage
from cube.job_config import TrainConfig, TuneConfig
from jobs.common import ensure_ray
from jobs.search_space import load_space
from jobs.sweep import link_inputs, max_epochs, run_sweep, trial_table

HERE = Path(__file__).resolve().parent
SPACE = HERE / "tune_bench_space.yaml"
BASE = ["cube.width=6", "cube.height=6", "cube.depth=4", "cube.channels=6", "cube.io_channels=2", "cube.steps=5",
        "optim.epochs=9"]


def sweep_dir(root: Path, source: Path, name: str) -> RunDir:
    """A sweep folder that reads the split of the run folder `source` where it is."""
    run = RunDir(root / name)
    run.path.mkdir(parents=True)
    link_inputs(RunDir(source), run)
    save_config(load_config(TrainConfig, None, BASE), run.path / "config.yaml")
    return run


def sweep(
    root: Path, split: Path, name: str, settings: TuneConfig, space_file: Path = SPACE
) -> tuple[pd.DataFrame, float]:
    run = sweep_dir(root, split, name)
    space = load_space([space_file], TrainConfig)
    start = time.perf_counter()
    results = run_sweep(run, settings, space, resume=False, storage=Storage.of(run.path).ray_storage())
    took = time.perf_counter() - start
    table = trial_table(results, space, max_epochs(to_dict(load_config(TrainConfig, run.path / "config.yaml")), space))
    return table, took


def best_after(table: pd.DataFrame, n: int) -> float:
    return float(np.nanmax(table["val_mrr"].to_numpy(float)[:n]))


def asha_vs_fifo(root: Path, split: Path, trials: int, seed: int) -> str:
    rows = []
    for scheduler in ("fifo", "asha"):
        settings = TuneConfig(trials=trials, scheduler=scheduler, search="random", seed=seed, robustness_seeds=0,
                              grace_period=1, reduction_factor=3)
        table, took = sweep(root, split, f"{scheduler}-{seed}", settings)
        rows.append((scheduler, int(table["trial_epochs"].sum()), best_after(table, trials), took))
    (_, fifo_epochs, fifo_best, _), (_, asha_epochs, asha_best, _) = rows
    lines = ["| scheduler | trial-epochs | best val MRR | wall s |", "|---|---|---|---|"]
    lines += [f"| {s} | {e} | {b:.3f} | {t:.0f} |" for s, e, b, t in rows]
    lines.append(
        f"\nASHA spent {asha_epochs / fifo_epochs:.2f} of FIFO's trial-epochs; best MRR {asha_best - fifo_best:+.3f} "
        f"against FIFO ({trials} trials each, random search seed {seed})."
    )
    return "\n".join(lines)


def tpe_vs_random(root: Path, split: Path, trials: int, seed: int) -> str:
    found = {}
    for search in ("random", "tpe"):
        settings = TuneConfig(trials=trials, scheduler="asha", search=search, seed=seed, robustness_seeds=0,
                              max_concurrent=2, grace_period=1)
        table, _ = sweep(root, split, f"{search}-{seed}", settings)
        found[search] = [best_after(table, n) for n in (10, 20, trials)]
    lines = [f"| search | best after 10 | after 20 | after {trials} |", "|---|---|---|---|"]
    lines += [f"| {s} | " + " | ".join(f"{v:.3f}" for v in vals) + " |" for s, vals in found.items()]
    return "\n".join(lines)


def throughput(root: Path, split: Path, trials: int) -> str:
    fixed = root / "fixed_space.yaml"
    fixed.write_text("cube.hidden: {distribution: choice, values: [16]}\n")  # every trial the same size
    lines = ["| trials at once | trials/hour | relative to 1 |", "|---|---|---|"]
    base = None
    for n in (1, 2, 4):
        settings = TuneConfig(trials=trials, scheduler="fifo", search="random", max_concurrent=n, robustness_seeds=0,
                              cpus_per_trial=2.0 / n if n > 1 else 1.0)
        _, took = sweep(root, split, f"throughput-{n}", settings, fixed)
        rate = trials / took * 3600
        base = base or rate
        lines.append(f"| {n} | {rate:.0f} | {rate / base:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `cube train` run folder: its split and teacher")
    p.add_argument("--what", nargs="+", default=["asha-fifo", "tpe-random", "throughput"])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ensure_ray()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if "asha-fifo" in args.what:
            print("## ASHA against FIFO\n\n" + asha_vs_fifo(root, args.run, args.trials // 2, args.seed), flush=True)
        if "tpe-random" in args.what:
            print(
                "\n## TPE against random search\n\n" + tpe_vs_random(root, args.run, args.trials, args.seed),
                flush=True,
            )
        if "throughput" in args.what:
            print("\n## Sweep throughput\n\n" + throughput(root, args.run, 8), flush=True)


if __name__ == "__main__":
    main()
