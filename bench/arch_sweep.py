"""Cube variants against the baselines over several seeds and datasets, with the product's own paths.

    python -m bench.arch_sweep --split runs/smollm2 --split runs/medquad \\
        --variants default,ep24 --seeds 3 --device cuda --jobs 8 --json out.json

Each variant is a set of `--set`-style overrides applied to the default TrainConfig (the same
code path as a tuning trial); each (dataset, variant, seed) trains with `cube.train.loop.fit` on
the split's training pairs and is scored on val and test with the same pool definition as
`cube eval` (every question against its split's distinct answers). Baselines are fit once per
dataset on the same split (the MLP over the same seeds). No Ray, so it runs on a GPU box.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cube.config import to_dict
from cube.data.rundir import RunDir
from cube.eval.baselines import Centering, TrainData, fit_baselines
from cube.eval.inference import score_held_out
from cube.eval.report import score_baselines
from cube.job_config import TrainConfig
from cube.model import count_parameters
from cube.train.loop import build_model, fit
from jobs.search_space import trial_config

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "norm": {"cube.normalize_input": True},
    "norm_ep24": {"cube.normalize_input": True, "optim.epochs": 24},
    "mlp": {"cube.adapter": "mlp", "cube.normalize_input": True},
    "mlp_ep24": {"cube.adapter": "mlp", "cube.normalize_input": True, "optim.epochs": 24},
    "mlp_ep24_t05": {"cube.adapter": "mlp", "cube.normalize_input": True, "optim.epochs": 24, "loss.temperature": 0.05},
    # the ablation: the same adapters with the lattice switched off
    "mlp_ep24_off": {"cube.adapter": "mlp", "cube.normalize_input": True, "optim.epochs": 24, "cube.lattice": False},
    # skip: the lattice adds to a direct map of the question (with the MLP adapter, an MLP)
    "skip": {"cube.skip": True},
    "skip_mlp": {"cube.skip": True, "cube.adapter": "mlp", "cube.normalize_input": True},
    "skip_mlp_off": {"cube.skip": True, "cube.adapter": "mlp", "cube.normalize_input": True, "cube.lattice": False},
    "ep24": {"optim.epochs": 24},
    "temp0.05": {"loss.temperature": 0.05},
    "fire1.0": {"cube.fire_rate": 1.0},
    "io8": {"cube.io_channels": 8},
    "hidden64": {"cube.hidden": 64},
    "bs64": {"optim.batch_size": 64},
    "no_jitter": {"cube.steps_jitter": 0},
}


def dataset(path: str, device: str) -> dict[str, Any]:
    """A `cube train` run folder's split: the training pairs on `device`, val and test whole."""
    data = RunDir(path).split()
    train = data.split("train")
    return {"train": type(train)(train.q.to(device), train.a.to(device)), "val": data.held_out("val"),
            "test": data.held_out("test")}


def run_one(job: tuple[str, str, dict[str, Any], int, str, int]) -> dict[str, Any]:
    path, name, overrides, seed, device, threads = job
    torch.set_num_threads(threads)
    splits = dataset(path, device)
    cfg = trial_config(TrainConfig, {**to_dict(TrainConfig()), "seed": seed}, overrides)
    train = splits["train"]
    start = time.perf_counter()
    model = build_model(cfg.cube, train.q.mean(0), train.a.mean(0), device, seed)
    fit(model, train, splits["val"], cfg.loss, cfg.optim, seed=seed)
    out = {s: score_held_out(model, splits[s])["mrr"] for s in ("val", "test")}
    out["test_2T"] = score_held_out(model, splits["test"], steps=2 * cfg.cube.steps)["mrr"]  # stability
    return {"split": path, "variant": name, "seed": seed, **out, "params": count_parameters(model),
            "seconds": time.perf_counter() - start}


def baselines(path: str, seeds: int) -> dict[str, dict[str, float]]:
    splits = dataset(path, "cpu")
    train = splits["train"]
    fitted = fit_baselines(TrainData.in_memory(train), splits["val"], seeds=seeds)
    c = Centering.fit(train)
    return {
        s: {k: v["mrr"] for k, v in score_baselines(fitted, c, splits[s])["baselines"].items()} for s in ("val", "test")
    }


def summarise(rows: list[dict], base: dict[str, dict]) -> str:
    lines = []
    for path in dict.fromkeys(r["split"] for r in rows):
        b = base[path]
        best = max(b["val"], key=b["val"].get)  # chosen on val, like everything else
        lines += [
            "",
            f"## {path}",
            "",
            f"best baseline on val: {best} (val {b['val'][best]:.3f}, test {b['test'][best]:.3f}); "
            "test: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(b["test"].items(), key=lambda kv: -kv[1])),
            "",
            "| variant | val MRR | test MRR | test − best baseline | test at 2T | params | s/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(r["variant"] for r in rows):
            rs = [r for r in rows if r["split"] == path and r["variant"] == name]
            if not rs:
                continue
            val, test, t2 = (np.array([r[k] for r in rs]) for k in ("val", "test", "test_2T"))
            lines.append(f"| {name} | {val.mean():.3f} ± {val.std():.3f} | {test.mean():.3f} ± {test.std():.3f} | "
                         f"{test.mean() - b['test'][best]:+.3f} | {t2.mean():.3f} | {rs[0]['params']:,} | "
                         f"{np.mean([r['seconds'] for r in rs]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", action="append", default=[], help="a `cube train` run folder (repeatable): its split")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="default", help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="an ad-hoc variant, e.g. --set 'lr3e-3:optim.lr=0.003'")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (processes sharing the device)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument(
        "--no-baselines", action="store_true", help="only the cube runs (fit the baselines later, elsewhere)"
    )
    p.add_argument("--from-json", nargs="+", help="summarise runs saved with --json (their splits must be here)")
    args = p.parse_args()
    variants = {v: VARIANTS[v] for v in args.variants.split(",") if v}
    for spec in args.extra:
        name, _, pairs = spec.partition(":")
        import yaml

        variants[name] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs.split(","))}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # seed-major: a run cut short by a time limit still has whole seeds of every variant
    jobs = [(path, name, ov, seed, args.device, threads) for seed in range(args.seeds) for path in args.split
            for name, ov in variants.items()]
    rows: list[dict] = []
    if args.from_json:  # runs made elsewhere (a GPU box); the baselines are fit here
        rows = [r for f in args.from_json for r in json.loads(Path(f).read_text())["runs"]]
        args.split = list(dict.fromkeys(r["split"] for r in rows))
    else:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, jobs):  # as each ends: a run cut short keeps what finished
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"runs": rows}, indent=1))
    if args.no_baselines:
        return
    base = {path: baselines(path, args.seeds) for path in args.split}
    print(summarise(rows, base))
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps({"runs": rows, "baselines": base}, indent=1))


if __name__ == "__main__":
    main()
