"""Cube variants against the baselines over several seeds, on one run's embeddings.

    python -m bench.arch_sweep --split runs/smollm2/split.parquet --device cuda --seeds 3

Trains each variant with the library's own training loop (cube.training) on the run's training
split and reports held-out MRR on val and test (each question ranked in its own split's pool),
mean ± std over seeds, next to the baselines fit on the same split. Ray is not needed, so it
runs on a GPU box where Ray is absent; on CPU it takes a few minutes per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from cube.baselines import Centering, Split, fit_baselines
from cube.losses import LossConfig
from cube.metrics import retrieval_metrics
from cube.model import CellularCube, CubeConfig, count_parameters
from cube.training import OptimConfig, make_optimizer, score, train_epoch

VARIANTS: dict[str, dict] = {
    "default": {},
    "fire1.0": {"cube": {"fire_rate": 1.0}},
    "epochs16": {"optim": {"epochs": 16}},
    "hidden64": {"cube": {"hidden": 64}},
    "io8": {"cube": {"io_channels": 8}},
    "C16_io8": {"cube": {"channels": 16, "io_channels": 8}},
    "steps16": {"cube": {"steps": 16}},
    "wd0.1": {"optim": {"weight_decay": 0.1}},
    "lr2e-3_ep16": {"optim": {"lr": 2e-3, "epochs": 16}},
    "surface0": {"loss": {"surface": 0.0}},
    "temp0.05": {"loss": {"temperature": 0.05}},
    "no_residual": {"cube": {"residual": False}},
    # optimiser steps: 2 DDP workers × batch 32 take half the steps per epoch of one process.
# The lr is scaled with the batch (OptimConfig.lr_reference_batch), so "bs64" runs at 2e-3.
    "bs16": {"optim": {"batch_size": 16}},
    "bs64": {"optim": {"batch_size": 64}},
    "bs64_lr2e-3": {"optim": {"batch_size": 64, "lr": 2e-3}},
    "bs16_lr2e-3": {"optim": {"batch_size": 16, "lr": 2e-3}},
    "lr3e-3": {"optim": {"lr": 3e-3}},
    "bs16_ep12": {"optim": {"batch_size": 16, "epochs": 12}},
    "bs16_fire1.0": {"optim": {"batch_size": 16}, "cube": {"fire_rate": 1.0}},
    "jitter4": {"cube": {"steps_jitter": 4}},
    "jitter12": {"cube": {"steps_jitter": 12}},
    "jitter12_internal0.1": {"cube": {"steps_jitter": 12}, "loss": {"internal": 0.1}},
    "internal0.1": {"loss": {"internal": 0.1}},
    "no_jitter": {"cube": {"steps_jitter": 0}},
    "bs64_no_jitter": {"optim": {"batch_size": 64}, "cube": {"steps_jitter": 0}},
    "bs64_ep12": {"optim": {"batch_size": 64, "epochs": 12}},
    "bs64_ep16": {"optim": {"batch_size": 64, "epochs": 16}},
    # fixed rates, to reproduce sweeps that ran before the lr was scaled with the batch
    "bs64_lr1e-3_fixed": {"optim": {"batch_size": 64, "lr_reference_batch": 0}},
    "bs64_lr2e-3_fixed": {"optim": {"batch_size": 64, "lr": 2e-3, "lr_reference_batch": 0}},
}


def load_split(path: str, device: str) -> dict[str, Split]:
    table = pq.read_table(path)
    split = np.array(table.column("split").to_pylist())

    def vec(name: str) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)

    q, a = vec("q_vec"), vec("a_vec")
    return {s: Split(torch.tensor(q[split == s], device=device), torch.tensor(a[split == s], device=device))
            for s in ("train", "val", "test")}


def run_variant(splits: dict[str, Split], overrides: dict, seed: int, device: str) -> dict[str, float]:
    cube = dataclasses.replace(CubeConfig(), **overrides.get("cube", {}))
    loss = dataclasses.replace(LossConfig(), **overrides.get("loss", {}))
    optim = dataclasses.replace(OptimConfig(), **overrides.get("optim", {}))
    torch.manual_seed(seed)
    train = splits["train"]
    c = Centering.fit(train)
    model = CellularCube(cube, train.q.shape[1]).to(device, memory_format=torch.channels_last_3d)
    model.set_centering(c.q_mean, c.a_mean)
    steps = len(train.q) // optim.batch_size
    opt, sched = make_optimizer(model, optim, steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(optim.epochs):
        order = torch.randperm(len(train.q), generator=gen)[: steps * optim.batch_size].to(device)
        batches = [(train.q[i], train.a[i]) for i in order.split(optim.batch_size)]
        train_epoch(model, batches, opt, sched, loss, optim)
    out = {s: score(model, splits[s].q.cpu(), splits[s].a.cpu(), torch.arange(len(splits[s].q)))["mrr"] for s in ("val", "test")}
    test = splits["test"]
    out["test_2T"] = score(model, test.q.cpu(), test.a.cpu(), torch.arange(len(test.q)), steps=2 * cube.steps)["mrr"]  # stability
    return {**out, "params": count_parameters(model), "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", required=True, help="split.parquet of a `cube train` run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()
    splits = load_split(args.split, args.device)
    rows: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        base = fit_baselines(splits["train"], splits["val"], param_budget=1_000_000, seed=seed)
        c = Centering.fit(splits["train"])
        for name, pred in base.items():
            res = {s: retrieval_metrics(pred.predict(splits[s].q), c.answers(splits[s].a, pred.space),
                                        torch.arange(len(splits[s].q), device=splits[s].q.device))["mrr"] for s in ("val", "test")}
            rows.setdefault(f"baseline:{name}", []).append(res)
        for name in args.variants:
            rows.setdefault(name, []).append(run_variant(splits, VARIANTS[name], seed, args.device))
            print(f"seed {seed} {name}: {rows[name][-1]}", flush=True)
    print(f"\n{'method':<26} {'val MRR':>14} {'test MRR':>14} {'val+test':>14} {'test at 2T':>14}")
    for name, results in rows.items():
        val = np.array([r["val"] for r in results])
        test = np.array([r["test"] for r in results])
        both = (val + test) / 2
        at_2t = np.array([r.get("test_2T", np.nan) for r in results])
        print(f"{name:<26} {val.mean():>8.3f}±{val.std():.3f} {test.mean():>8.3f}±{test.std():.3f} "
              f"{both.mean():>8.3f}±{both.std():.3f} {at_2t.mean():>8.3f}±{at_2t.std():.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
