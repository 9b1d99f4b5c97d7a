"""A sweep's results as a table, a Markdown report and pictures (no Ray: it reads a DataFrame).

    results.csv / results.md   every trial, sorted by validation MRR
    pareto.png                 validation MRR against parameters and latency, baselines as lines
    importance.png             Optuna's parameter importances (fANOVA)
    history.png                validation MRR over trials, with the running best
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from jobs.search_space import Param

COLUMNS = ["trial_id", "status", "val_mrr", "val_recall_at_1", "val_cos", "best_epoch", "epochs_run", "params",
           "latency_ms", "error"]


def ordered(table: pd.DataFrame, space: list[Param]) -> pd.DataFrame:
    """Sorted by validation MRR (errored trials last), our columns first, then the draws."""
    cols = [c for c in COLUMNS if c in table] + [p.key for p in space if p.key in table]
    return table.sort_values("val_mrr", ascending=False, na_position="last")[cols].reset_index(drop=True)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both axes (lower x, higher y), by x."""
    order = np.argsort(x)
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(table: pd.DataFrame, baselines: dict[str, float], out: Path) -> Path:
    plt = _plt()
    done = table.dropna(subset=["val_mrr", "params", "latency_ms"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, col, label in ((axes[0], "params", "parameters"), (axes[1], "latency_ms", "latency per question (ms)")):
        x, y = done[col].to_numpy(float), done["val_mrr"].to_numpy(float)
        stopped = (done["status"] != "finished").to_numpy()
        ax.scatter(x[~stopped], y[~stopped], s=22, label="finished", color="tab:blue")
        ax.scatter(x[stopped], y[stopped], s=22, marker="x", label="stopped early", color="tab:gray")
        if len(x):
            front = pareto_front(x, y)
            ax.step(x[front], y[front], where="post", color="tab:red", lw=1.2, label="Pareto front")
        for i, (name, mrr) in enumerate(sorted(baselines.items(), key=lambda kv: -kv[1])[:4]):
            ax.axhline(mrr, ls="--", lw=0.9, color=f"C{i + 2}", label=f"{name} {mrr:.3f}")
        if len(x) and x.min() > 0 and x.max() / x.min() > 10:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation MRR (best epoch)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("cube trials: quality against size and speed (baselines fit on the same training split)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def importances(table: pd.DataFrame, space: list[Param]) -> dict[str, float]:
    """Optuna's fANOVA importances from the best validation MRR of the trials that ran their
    whole budget: a trial ASHA stopped after two epochs is not comparable with one that ran ten.

    Returns an empty dict when there are too few such trials or nothing varied."""
    import optuna

    done = table[table["status"] == "finished"].dropna(subset=["val_mrr"])
    varied = [p for p in space if done[p.key].nunique() > 1] if len(done) else []
    if len(done) < 4 or not varied:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in done.iterrows():
        params = {p.key: (row[p.key].item() if hasattr(row[p.key], "item") else row[p.key]) for p in varied}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={p.key: p.to_optuna() for p in varied},
                                                  value=float(row["val_mrr"])))
    return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def plot_importance(values: dict[str, float], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(3, len(values)) + 1))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for validation MRR (fANOVA)")
    ax.set_title("which settings mattered (trials that ran their whole budget)" if values
                 else "too few trials ran their whole budget for importances")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_history(table: pd.DataFrame, baselines: dict[str, float], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    y = table["val_mrr"].to_numpy(float)
    ax.plot(np.arange(1, len(y) + 1), y, "o", ms=4, label="trial")
    ax.plot(
        np.arange(1, len(y) + 1),
        np.fmax.accumulate(np.nan_to_num(y, nan=-np.inf)),
        "-",
        color="tab:red",
        label="best so far",
    )
    if baselines:
        name, mrr = max(baselines.items(), key=lambda kv: kv[1])
        ax.axhline(mrr, ls="--", color="tab:green", label=f"best baseline ({name}) {mrr:.3f}")
    ax.set_xlabel("trial (in the order they were started)")
    ax.set_ylabel("validation MRR")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _md_table(df: pd.DataFrame) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_report(folder: Path, table: pd.DataFrame, space: list[Param], baselines_val: dict[str, float],
                 settings: dict[str, Any], extra: str = "") -> Path:
    """results.csv, results.md and the three pictures; returns results.md."""
    folder = Path(folder)
    by_start = table  # the order trials were started in, for the history plot
    table = ordered(table, space)
    table.to_csv(folder / "results.csv", index=False)
    imp = importances(table, space)
    plot_pareto(table, baselines_val, folder / "pareto.png")
    plot_importance(imp, folder / "importance.png")
    plot_history(by_start, baselines_val, folder / "history.png")
    counts = table["status"].value_counts().to_dict()
    spent = int(by_start.get("trial_epochs", pd.Series(dtype=float)).fillna(0).sum())
    lines = [
        "# Sweep results", "",
        f"{len(table)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}); {spent} trial-epochs in all. "
        f"Search: {settings.get('search')}, scheduler: {settings.get('scheduler')}. Ranked by validation MRR only; "
        "the test split is used once, for the chosen configuration (below).", "",
        "Baselines on the validation split (fit on the same training split): "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(baselines_val.items(), key=lambda kv: -kv[1])), "",
        "![Pareto](pareto.png)", "", "![history](history.png)", "", "![importance](importance.png)", "",
        "Importances: " + (", ".join(f"{k} {v:.2f}" for k, v in imp.items()) or "too few trials"), "",
        extra, "", _md_table(table), "",
    ]
    (folder / "results.md").write_text("\n".join(lines), encoding="utf-8")
    return folder / "results.md"
