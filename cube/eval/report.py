"""The honest comparison: the cube against every baseline, on held-out pairs, same pool.

The candidate pool is the distinct answers of the evaluated pairs; each question is ranked
against all of them, so the chance level is known and stated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from cube.data.rundir import RunDir
from cube.eval.baselines import Centering, MLPRecipe, Predictor, TrainData, fit_baselines
from cube.eval.inference import predict
from cube.eval.metrics import METRICS, HeldOut, Split, chance_metrics, retrieval_metrics, top_k
from cube.job_config import TrainConfig
from cube.model import CellularCube, count_parameters
from cube.train.checkpoint import load_checkpoint

__all__ = ["HeldOut", "baseline_report", "compare", "evaluate_run", "format_report", "score_baselines"]


def _mean_metrics(predictors: list[Predictor], test: HeldOut, centering: Centering) -> dict[str, float]:
    runs = [
        retrieval_metrics(p.predict(test.q), test.pool, test.target, centering.offset(p.space)) for p in predictors
    ]
    out = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    if len(runs) > 1:
        mrrs = torch.tensor([r["mrr"] for r in runs])
        out["mrr_std"] = mrrs.std(unbiased=False).item()
    return out


def score_baselines(fitted: dict[str, list[Predictor]], centering: Centering, test: HeldOut) -> dict:
    """Held-out metrics of fitted baselines (mean over seeds where stochastic) and the best one."""
    metrics = {name: _mean_metrics(preds, test, centering) for name, preds in fitted.items()}
    details = {name: {"space": preds[0].space, "detail": preds[0].detail} for name, preds in fitted.items()}
    best = max(metrics, key=lambda k: metrics[k]["mrr"])
    return {"baselines": metrics, "baseline_details": details, "best_baseline": best}


def baseline_report(train: TrainData, val: HeldOut, test: HeldOut, seeds: int = 3, which: str = "all",
                    recipe: MLPRecipe = MLPRecipe()) -> dict:
    """The baselines `which` fit on `train` (choices made on `val`), scored on `test`."""
    return score_baselines(fit_baselines(train, val, seeds, which, recipe), train.centering, test)


def compare(model: CellularCube, train: TrainData | Split, val: HeldOut, test: HeldOut, seeds: int = 3,
            n_examples: int = 5, baselines: dict | None = None, which: str = "all",
            recipe: MLPRecipe = MLPRecipe()) -> dict:
    """Report dict: pool size, chance, cube and baseline metrics, best baseline, examples.

    `baselines` is a `baseline_report` already computed on the same split (a sweep fits them once)."""
    if isinstance(train, Split):
        train = TrainData.in_memory(train)
    report: dict = {"pool_size": len(test.pool), "n_questions": len(test.q), "chance": chance_metrics(len(test.pool))}
    cube_pred = predict(model, test.q)
    report["cube"] = retrieval_metrics(cube_pred, test.pool, test.target, offset=model.a_mean.cpu())
    report["cube_params"] = count_parameters(model)
    report.update(baselines or baseline_report(train, val, test, seeds, which, recipe))
    best = report["best_baseline"]
    report["cube_minus_best_mrr"] = report["cube"]["mrr"] - report["baselines"][best]["mrr"]
    shown = torch.arange(0, len(test.q), max(1, len(test.q) // n_examples))[:n_examples]
    picks = top_k(cube_pred[shown], test.pool, 1, offset=model.a_mean.cpu())[1][:, 0]
    finite = torch.isfinite(cube_pred[shown]).all(1)
    report["examples"] = [
        {"question": test.questions[i], "cube_answer": test.answers[int(pick)] if ok else "(non-finite prediction)",
         "true_answer": test.answers[int(test.target[i])], "correct": bool(ok and pick == test.target[i])}
        for i, pick, ok in zip(shown.tolist(), picks.tolist(), finite.tolist())
    ]
    return report


def run_train_data(run: RunDir) -> TrainData:
    """The run's training split as the baselines stream it (blocks in file order, and shuffled
    batches), centred with the run's own means."""
    split, m = run.split(), run.moments()

    def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for q, a in split.vector_batches("train"):
            yield torch.from_numpy(q), torch.from_numpy(a)

    centering = Centering(torch.from_numpy(m.q_mean).float(), torch.from_numpy(m.a_mean).float())
    return TrainData(m.count, centering, blocks, lambda batch_size, seed: split.shuffled("train", batch_size, seed))


def evaluate_run(run_path: str | Path, test: HeldOut | None = None, source: str | None = None,
                 fitted: dict[str, list[Predictor]] | None = None, baselines: str | None = None) -> dict:
    """The comparison report for a run: on its own test split (a seeded sample of
    `eval_questions` of them when there are more, ranked against every test answer), or on
    `test` (from another file).

    `fitted` are baselines already fit on the run's training split (a sweep fits them once);
    `baselines` chooses which to fit (see parse_baselines), the run's config's by default."""
    run = RunDir(run_path)
    run.require("model", "split.json", "teacher.json", "config.yaml")
    teacher, _ = run.teacher()
    model, _ = load_checkpoint(run.model_dir, expected_teacher=teacher.identity())
    cfg = run.config(TrainConfig)
    split = run.split()
    train = run_train_data(run)
    total = None
    if test is None:
        total = split.count("test")
        test = split.held_out("test", questions=cfg.eval_questions, seed=cfg.data.seed)
    val = split.held_out("val", questions=cfg.val_questions, seed=cfg.data.seed)
    scored = score_baselines(fitted, train.centering, test) if fitted else None
    report = compare(model, train, val, test, seeds=cfg.baseline_seeds, baselines=scored,
                     which=baselines or cfg.baselines, recipe=MLPRecipe(threads=cfg.baseline_threads))
    report["evaluated_on"] = source or f"{split.root} (test split)"
    if total is not None and total > len(test):
        report["n_questions_in_split"] = total
    report["teacher"] = teacher.identity()
    return report


def format_report(report: dict, n_examples: int = 5) -> str:
    """The comparison as a plain-text table, best baseline marked, examples below."""
    header = f"{'method':<18} {'space':<8} " + " ".join(f"{m:>9}" for m in METRICS)
    lines = [
        f"held-out questions: {report['n_questions']}"
        + (f" (a seeded sample of {report['n_questions_in_split']})" if "n_questions_in_split" in report else "")
        + f", candidate pool: {report['pool_size']} distinct answers",
        header,
        "-" * len(header),
    ]

    def row(name: str, space: str, m: dict) -> str:
        spread = f" ±{m['mrr_std']:.3f}" if "mrr_std" in m else ""
        return f"{name:<18} {space:<8} " + " ".join(f"{m[k]:>9.3f}" if k in m else f"{'':>9}" for k in METRICS) + spread

    lines.append(row("cube", "centred", report["cube"]))
    for name, m in report["baselines"].items():
        mark = "  <- best baseline" if name == report["best_baseline"] else ""
        lines.append(row(name, report["baseline_details"][name]["space"], m) + mark)
    lines.append(row("chance", "", report["chance"]))
    shown = round(report["cube_minus_best_mrr"], 3)  # the verdict says what the table shows
    verdict = "beats" if shown > 0 else ("ties" if shown == 0 else "is below")
    lines.append(
        f"cube MRR {verdict} the best baseline ({report['best_baseline']}) by {report['cube_minus_best_mrr']:+.3f}"
    )
    if report["cube"].get("nonfinite", 0) > 0:
        share = report["cube"]["nonfinite"]
        lines.append(f"WARNING: {share:.0%} of the cube's predictions are non-finite (NaN or inf); they rank last. "
                     "The checkpoint is broken: retrain with a lower optim.lr")
    lines.append("")
    lines.append("examples (cube's answer = nearest of the pool's answers to its prediction):")
    for ex in report["examples"][:n_examples]:
        lines += [
            f"  Q: {ex['question']}",
            f"  cube: {_short(ex['cube_answer'])}" + ("  [right]" if ex["correct"] else "  [wrong]"),
        ]
        if not ex["correct"]:
            lines.append(f"  true: {_short(ex['true_answer'])}")
    return "\n".join(lines)


def _short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"
