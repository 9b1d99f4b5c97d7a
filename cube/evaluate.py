"""The honest comparison: the cube against every baseline, on held-out pairs, same pool.

The candidate pool is the distinct answers of the evaluated pairs; each question is ranked
against all of them, so the chance level is known and stated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cube.baselines import Centering, Split, fit_baselines
from cube.metrics import METRICS, chance_metrics, retrieval_metrics
from cube.model import CellularCube, count_parameters
from cube.training import predict


@dataclass
class HeldOut:
    """Held-out questions and the pool of distinct answers they are ranked against."""

    q: torch.Tensor  # (N, E) raw question embeddings
    pool: torch.Tensor  # (P, E) raw embeddings of distinct answers
    target: torch.Tensor  # (N,) index of each question's answer in the pool
    questions: list[str]
    answers: list[str]  # pool texts

    @classmethod
    def from_frame(cls, df: pd.DataFrame, q: np.ndarray, a: np.ndarray) -> "HeldOut":
        """`df` rows align with `q` and `a` (one embedding per row)."""
        index: dict[str, int] = {}  # answer text → pool position
        first_rows: list[int] = []  # the row that supplies each pool entry
        target = []
        for row, text in enumerate(df["answer"]):
            if text not in index:
                index[text] = len(index)
                first_rows.append(row)
            target.append(index[text])
        return cls(torch.as_tensor(q), torch.as_tensor(a[first_rows]), torch.tensor(target),
                   df["question"].tolist(), list(index))


def compare(model: CellularCube, train: Split, val: Split, test: HeldOut, seed: int = 0, n_examples: int = 5) -> dict:
    """Report dict: pool size, chance, cube and baseline metrics, best baseline, examples."""
    centering = Centering.fit(train)
    report: dict = {"pool_size": len(test.pool), "n_questions": len(test.q), "chance": chance_metrics(len(test.pool))}
    cube_pred = predict(model, test.q)
    report["cube"] = retrieval_metrics(cube_pred, test.pool - model.a_mean.cpu(), test.target)
    report["cube_params"] = count_parameters(model)
    report["baselines"] = {}
    report["baseline_details"] = {}
    for name, p in fit_baselines(train, val, count_parameters(model), seed=seed).items():
        report["baselines"][name] = retrieval_metrics(p.predict(test.q), centering.answers(test.pool, p.space), test.target)
        report["baseline_details"][name] = {"space": p.space, "detail": p.detail}
    best = max(report["baselines"], key=lambda k: report["baselines"][k]["mrr"])
    report["best_baseline"] = best
    report["cube_minus_best_mrr"] = report["cube"]["mrr"] - report["baselines"][best]["mrr"]
    scores = torch.nn.functional.normalize(cube_pred, dim=-1) @ torch.nn.functional.normalize(test.pool - model.a_mean.cpu(), dim=-1).T
    picks = scores.argmax(1)
    step = max(1, len(test.q) // n_examples)
    report["examples"] = [
        {"question": test.questions[i], "cube_answer": test.answers[int(picks[i])],
         "true_answer": test.answers[int(test.target[i])], "correct": bool(picks[i] == test.target[i])}
        for i in range(0, len(test.q), step)[:n_examples]
    ]
    return report


def format_report(report: dict) -> str:
    """The comparison as a plain-text table, best baseline marked, examples below."""
    header = f"{'method':<18} {'space':<8} " + " ".join(f"{m:>9}" for m in METRICS)
    lines = [f"held-out questions: {report['n_questions']}, candidate pool: {report['pool_size']} distinct answers", header,
             "-" * len(header)]

    def row(name: str, space: str, m: dict) -> str:
        return f"{name:<18} {space:<8} " + " ".join(f"{m[k]:>9.3f}" if k in m else f"{'':>9}" for k in METRICS)

    lines.append(row("cube", "centred", report["cube"]))
    for name, m in report["baselines"].items():
        mark = "  <- best baseline" if name == report["best_baseline"] else ""
        lines.append(row(name, report["baseline_details"][name]["space"], m) + mark)
    lines.append(row("chance", "", report["chance"]))
    verdict = "beats" if report["cube_minus_best_mrr"] > 0 else ("ties" if report["cube_minus_best_mrr"] == 0 else "is below")
    lines.append(f"cube MRR {verdict} the best baseline ({report['best_baseline']}) by {report['cube_minus_best_mrr']:+.3f}")
    lines.append("")
    lines.append("examples (cube's answer = nearest of the pool's answers to its prediction):")
    for ex in report["examples"]:
        lines += [f"  Q: {ex['question']}", f"  cube: {ex['cube_answer']}" + ("  [correct]" if ex["correct"] else ""),
                  f"  true: {ex['true_answer']}", ""]
    return "\n".join(lines)
