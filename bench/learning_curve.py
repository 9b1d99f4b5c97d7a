"""Does the cube get better with more data? Learning curves on one Q&A file, one process.

    python -m bench.learning_curve --data ../shared/datasets/medquad_full.jsonl --sizes 1000 4000 0 \\
        --seeds 3 --out docs/results/learning_curve

For each training size (0 = the whole training split) and seed: the cube with `cube train`'s
defaults, the same cube with the lattice off, and every baseline, all on the same leak-free
split (cube.data.qa.plan_splits) and scored on the same held-out test questions against the
whole test pool. The training pairs of a smaller size are a seeded subset of the training split;
validation and test never change. `cube train`'s two DDP workers of 32 are one process with a
batch of 64 here (the same global batch and rate; InfoNCE sees 64 in-batch negatives, not 32).
Vectors are embedded once (in this process, with the teacher) and cached in --out. Writes
results.csv, a Markdown table and a plot; while a row is unfinished, the parts it has finished
(the baselines, each cube) are kept in partial-TEACHER.json, and a rerun of the same command
goes on from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cube.config import load_config
from cube.data.qa import DataConfig, load_qa, split_pairs
from cube.eval.baselines import MLPRecipe, TrainData, fit_baselines
from cube.eval.inference import score_held_out
from cube.eval.metrics import HeldOut, Split
from cube.eval.report import score_baselines
from cube.job_config import TrainConfig
from cube.teachers import HFTeacher, TeacherConfig
from cube.train.loop import build_model, fit


def vectors(texts: list[str], teacher: str, cache: Path) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    model = HFTeacher(TeacherConfig(name=teacher))
    out = np.concatenate([model.embed(texts[i : i + 64]).vectors for i in range(0, len(texts), 64)])
    np.save(cache, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--teacher", default="minilm")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 0], help="training pairs; 0 = all")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--full-seeds", type=int, help="seeds at the whole training split (default --seeds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="TrainConfig overrides")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(TrainConfig, None, [f"teacher={args.teacher}", *args.overrides])
    df = split_pairs(load_qa(args.data, DataConfig()), cfg.data)
    texts = df["question"].tolist() + df["answer"].tolist()
    vec = vectors(texts, args.teacher, args.out / f"vectors-{args.teacher}-{len(df)}.npy")
    q, a = vec[: len(df)], vec[len(df) :]
    part = {s: (df["split"] == s).to_numpy() for s in ("train", "val", "test")}
    val = HeldOut.from_frame(df[part["val"]].reset_index(drop=True), q[part["val"]], a[part["val"]])
    test = HeldOut.from_frame(df[part["test"]].reset_index(drop=True), q[part["test"]], a[part["test"]])
    train_q, train_a = q[part["train"]], a[part["train"]]
    rows = []
    results = args.out / f"results-{args.teacher}.csv"
    done = pd.read_csv(results) if results.is_file() else pd.DataFrame()
    # A row's parts as they finish (its baselines, then each cube): a run cut off mid-row (the
    # whole split's row takes over an hour on a 2-core CPU) resumes from its last finished part.
    partial_path = args.out / f"partial-{args.teacher}.json"
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    for size in args.sizes:
        n = size or len(train_q)
        seeds = args.full_seeds if (size == 0 and args.full_seeds) else args.seeds
        for seed in range(seeds):
            if len(done) and ((done["size"] == n) & (done["seed"] == seed)).any():
                rows += done[(done["size"] == n) & (done["seed"] == seed)].to_dict("records")
                continue
            idx = np.sort(np.random.default_rng(seed).permutation(len(train_q))[:n])
            train = Split(torch.from_numpy(train_q[idx]), torch.from_numpy(train_a[idx]))
            key = f"{n}/{seed}"
            row = partial.get(key) or {"size": n, "seed": seed, "pool": len(test.pool), "questions": len(test),
                                       "seconds": 0.0}
            if "best_baseline" not in row:
                t0 = time.perf_counter()
                fitted = fit_baselines(TrainData.in_memory(train), val, seeds=1,
                                       recipe=MLPRecipe(threads=args.threads))
                base = score_baselines(fitted, TrainData.in_memory(train).centering, test)
                row.update({f"{k}": v["mrr"] for k, v in base["baselines"].items()})
                row["best_baseline"] = base["best_baseline"]
                save_part(partial_path, partial, key, row, t0)
            for name, lattice in (("cube", True), ("cube_no_lattice", False)):
                if name in row:
                    continue
                t0 = time.perf_counter()
                run_cfg = dataclasses.replace(cfg, cube=dataclasses.replace(cfg.cube, lattice=lattice), seed=seed)
                model = build_model(run_cfg.cube, train.q.mean(0), train.a.mean(0), seed=seed)
                # `cube train` runs `workers` DDP ranks of batch_size each: here one process takes
                # the global batch, at the rate the ranks would (peak_lr scales with the batch)
                optim = dataclasses.replace(run_cfg.optim, batch_size=run_cfg.optim.batch_size * run_cfg.workers)
                progress = fit(model, train, val, run_cfg.loss, optim, seed=seed)
                row[name] = score_held_out(model, test)["mrr"]
                row[f"{name}_best_val"] = progress.best_val_mrr
                save_part(partial_path, partial, key, row, t0)
            print(json.dumps(row), flush=True)
            rows.append(row)
            pd.DataFrame(rows).to_csv(results, index=False)
            partial.pop(key, None)
            if partial:
                partial_path.write_text(json.dumps(partial, indent=1))
            else:
                partial_path.unlink(missing_ok=True)
    table = pd.DataFrame(rows)
    write_report(table, args)


def save_part(path: Path, partial: dict, key: str, row: dict, since: float) -> None:
    """Record a finished part of a row (and the seconds it took) in the partial-results file."""
    row["seconds"] += time.perf_counter() - since
    partial[key] = row
    path.write_text(json.dumps(partial, indent=1))


def write_report(table: pd.DataFrame, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [c for c in ("identity", "identity_centred", "ridge", "ridge_centred", "mlp", "mlp_centred")
                 if c in table]
    table["strongest_baseline"] = table[baselines].max(axis=1)
    table["cube_minus_strongest"] = table["cube"] - table["strongest_baseline"]
    g = table.groupby("size")
    summary = pd.DataFrame({
        "seeds": g.size(),
        "cube": g["cube"].mean(), "cube_sd": g["cube"].std(ddof=0),
        "no_lattice": g["cube_no_lattice"].mean(),
        "strongest_baseline": g["strongest_baseline"].mean(),
        **{b: g[b].mean() for b in baselines},
        "cube_minus_strongest": g["cube_minus_strongest"].mean(),
        "cube_minus_strongest_sd": g["cube_minus_strongest"].std(ddof=0),
    }).reset_index()
    summary.to_csv(args.out / f"summary-{args.teacher}.csv", index=False)
    lines = [f"# Learning curve: {args.data.name}, teacher {args.teacher}", "",
             f"Held-out test MRR ({int(table['questions'].iloc[0])} questions, pool {int(table['pool'].iloc[0])} "
             "distinct answers), mean over seeds.", "",
             "| train pairs | seeds | cube | ± | lattice off | strongest baseline | " + " | ".join(baselines)
             + " | cube − strongest |", "|" + "---|" * (6 + len(baselines) + 1)]
    for _, r in summary.iterrows():
        lines.append(f"| {int(r['size']):,} | {int(r['seeds'])} | {r['cube']:.3f} | {r['cube_sd']:.3f} | "
                     f"{r['no_lattice']:.3f} | {r['strongest_baseline']:.3f} | "
                     + " | ".join(f"{r[b]:.3f}" for b in baselines)
                     + f" | {r['cube_minus_strongest']:+.3f} ± {r['cube_minus_strongest_sd']:.3f} |")
    (args.out / f"table-{args.teacher}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for col, label in (("cube", "cube (defaults)"), ("no_lattice", "cube, lattice off"),
                       ("strongest_baseline", "strongest baseline"), ("mlp_centred", "mlp_centred"),
                       ("ridge_centred", "ridge_centred")):
        if col in summary:
            ax.plot(summary["size"], summary[col], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training pairs")
    ax.set_ylabel("held-out test MRR")
    ax.set_title(f"{args.data.name} · {args.teacher}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"learning_curve-{args.teacher}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
