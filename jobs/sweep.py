"""Ray Tune + Optuna over the cube: trials, the Tuner, resume, and the winner's run folder.

A sweep folder is a run folder's inputs (config.yaml, teacher.json, split.json and the split
dataset: embedded once, trials read vectors and never the teacher) plus Tune's experiment (ray/)
and what the report writes. A trial is one call of `cube.train.loop.fit` in its own process,
streaming its batches from the split's Parquet files (one copy of the data on disk for all
trials, memory the size of a shuffle buffer) and reporting every epoch to Tune (ASHA stops weak
ones); with `workers_per_trial` it is a driver that fits its own Ray Train `TorchTrainer`
instead, the way Ray 2.60 combines Tune with Train.

Optuna learns only from comparable trials: Ray's OptunaSearch tells it that every ended trial
COMPLETEd with its last value, also those ASHA stopped after two epochs; `BudgetAwareOptuna`
tells it those were PRUNED, and errored ones FAILed.

Everything a Ray worker runs lives here, in an importable module; `cube tune` is jobs/tune.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
import yaml
from ray import tune
from ray.tune.search.optuna import OptunaSearch
from tqdm import tqdm

from cube.config import load_config, save_config, to_dict
from cube.data.rundir import RunDir, write_json
from cube.data.split import SplitData
from cube.data.storage import Storage
from cube.job_config import TrainConfig, TuneConfig
from cube.train.checkpoint import load_checkpoint, load_train_state, publish, save_epoch
from cube.train.loop import EpochEnd, build_model, fit
from jobs.common import SweepError, node_resources, require_resources
from jobs.search_space import Param, trial_config

log = logging.getLogger("cube.tune")
METRIC = "val_mrr"
EXPERIMENT = "sweep"


# ---------------------------------------------------------------- trials (run in Ray workers)


def cube_trial(params: dict[str, Any], *, base: dict[str, Any], split_root: str, teacher: dict[str, Any],
               moments: dict[str, list[float]], rows: int, threads: int) -> None:
    """One in-process training run: the draws applied to the base config, the training split
    streamed from its Parquet files, reported every epoch."""
    torch.set_num_threads(threads)
    cfg = trial_config(TrainConfig, base, params)  # an invalid combination fails here, with the rule's message
    device = "cuda" if torch.cuda.is_available() else "cpu"
    split = SplitData(split_root)
    val = split.held_out("val", questions=cfg.val_questions, seed=cfg.data.seed)
    probe = split.probe(val, questions=cfg.val_questions, seed=cfg.data.seed)
    model = build_model(cfg.cube, torch.tensor(moments["q_mean"]), torch.tensor(moments["a_mean"]), device, cfg.seed)
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint:  # the trial was interrupted (its node died, or the sweep was resumed)
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_checkpoint(d)[0].state_dict())
            state = load_train_state(d)

    def report(end: EpochEnd) -> None:
        with tempfile.TemporaryDirectory() as d:
            save_epoch(d, end, teacher, cfg.data.seed)
            tune.report(end.metrics, checkpoint=tune.Checkpoint.from_directory(d))

    batches = split.shuffled("train", cfg.optim.batch_size, cfg.seed, buffer=TRIAL_SHUFFLE_BUFFER)
    fit(model, batches, val, cfg.loss, cfg.optim, seed=cfg.seed, probe=probe, on_epoch=report, state=state,
        steps_per_epoch=rows // cfg.optim.batch_size)


TRIAL_SHUFFLE_BUFFER = 65_536  # rows a trial mixes at once (its memory for training data)


def train_driver_trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, workers: int) -> None:
    """A trial that fits its own Ray Train TorchTrainer (DDP over `workers`), reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs.trainer import trainer_for

    cfg = trial_config(TrainConfig, {**base, "workers": workers}, params)
    trial = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    trial.mkdir(parents=True, exist_ok=True)
    save_config(cfg, trial / "config.yaml")
    link_inputs(RunDir(sweep_dir), RunDir(trial))
    trainer_for(RunDir(trial), cfg, Storage.of(trial).ray_storage(), callbacks=[TuneReportCallback()]).fit()


# ---------------------------------------------------------------- the Tuner


def trainable(sweep: RunDir, settings: TuneConfig):
    """The trial function with its data bound (where it is, never the data) and its resources declared."""
    base = to_dict(sweep.config(TrainConfig))
    if settings.workers_per_trial:
        fn = tune.with_parameters(train_driver_trial, base=base, sweep_dir=str(sweep.path.resolve()),
                                  workers=settings.workers_per_trial)
        return tune.with_resources(fn, {"CPU": 0})  # the driver only waits; its workers hold the resources
    teacher, _ = sweep.teacher()
    info = sweep.split_info()
    split = sweep.split()
    root = split.root if "://" in split.root else str(Path(split.root).resolve())
    fn = tune.with_parameters(cube_trial, base=base, split_root=root, teacher=teacher.identity(),
                              moments={"q_mean": info["q_mean"], "a_mean": info["a_mean"]},
                              rows=info["rows"]["train"], threads=max(1, math.floor(settings.cpus_per_trial)))
    return tune.with_resources(fn, trial_resources(settings, trial_memory(sweep)))


def trial_memory(sweep: RunDir) -> float:
    """Bytes one in-process trial holds beside torch itself: its validation sample and its
    probe (each rank against a whole pool), its shuffle buffer, and headroom for the model,
    its optimiser and a batch through the lattice. What Ray's `memory` resource reserves, so
    that the concurrency limit respects memory as well as CPUs and GPUs."""
    cfg = sweep.config(TrainConfig)
    _, dim = sweep.teacher()
    info = sweep.split_info()
    row = 2 * dim * 4 + 200  # two float32 vectors and some text
    held = min(info["rows"]["val"], 10 * max(cfg.val_questions, 1)) * row * 2
    return float(held + TRIAL_SHUFFLE_BUFFER * row * 3 + 512 * 2**20)


def trial_resources(settings: TuneConfig, memory: float = 0.0) -> dict[str, float]:
    if settings.workers_per_trial:
        return {"CPU": 1.0, "GPU": settings.gpus_per_trial}  # one Ray Train worker
    return {"CPU": settings.cpus_per_trial, "GPU": settings.gpus_per_trial, "memory": memory}


def concurrency(settings: TuneConfig, memory: float = 0.0) -> int:
    """Trials at once: the setting, or as many as the cluster's nodes hold (CPUs, GPUs and memory)."""
    if settings.max_concurrent:
        return settings.max_concurrent
    per_trial = trial_resources(settings, memory)
    slots = sum(int(min(node.get(k, 0.0) / v for k, v in per_trial.items() if v)) for node in node_resources())
    return max(1, min(slots // max(1, settings.workers_per_trial), settings.trials))


def max_epochs(base: dict[str, Any], space: list[Param]) -> int:
    for p in space:
        if p.key == "optim.epochs":
            return int(max(p.values) if p.distribution == "choice" else p.high)
    return int(base["optim"]["epochs"])


class BudgetAwareOptuna(OptunaSearch):
    """OptunaSearch that tells Optuna what really happened to a trial. Ray's own tells it every
    ended trial COMPLETEd with its last reported value: a trial ASHA stopped after two epochs
    then counts for TPE as a full run, and an errored one as a success. Here:

    - a trial that ran its budget (or stopped on its own patience: `finished` in its last
      report) is COMPLETE, with the best validation MRR it reached (the checkpoint it keeps);
    - a trial the scheduler stopped is PRUNED, its per-epoch values kept as intermediates;
    - an errored trial, or a value that is not finite, is FAIL: Optuna never sees NaN or inf.
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        value = (result or {}).get("best_val_mrr")
        if error or value is None or not math.isfinite(value):
            state, value = TrialState.FAIL, None
        elif not (result or {}).get("finished"):
            state, value = TrialState.PRUNED, None
        else:
            state = TrialState.COMPLETE
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
        self._completed_trials.add(trial_id)


def build_tuner(sweep: RunDir, settings: TuneConfig, space: list[Param], storage: str, callbacks: list | None = None):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    base = to_dict(sweep.config(TrainConfig))
    epochs = max_epochs(base, space)
    if settings.search == "tpe":
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=min(10, max(3, settings.trials // 4)))
    else:
        sampler = optuna.samplers.RandomSampler(seed=settings.seed)
    memory = trial_memory(sweep) if not settings.workers_per_trial else 0.0
    searcher = ConcurrencyLimiter(BudgetAwareOptuna(sampler=sampler), max_concurrent=concurrency(settings, memory))
    if settings.scheduler == "asha":
        scheduler = AsyncHyperBandScheduler(
            time_attr="epoch",
            max_t=epochs,
            grace_period=min(settings.grace_period, epochs),
            reduction_factor=settings.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable(sweep, settings),
        param_space={p.key: p.to_tune() for p in space},
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=settings.trials, reuse_actors=False),
        run_config=tune.RunConfig(
            name=EXPERIMENT, storage_path=storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=METRIC,
                                                    checkpoint_score_order="max"),
            callbacks=callbacks or [],
        ),
    )


def run_sweep(sweep: RunDir, settings: TuneConfig, space: list[Param], resume: bool, storage: str,
              callbacks: list | None = None):
    """Fit the Tuner (or restore it, leaving finished trials alone); returns the ResultGrid.
    `storage` is Tune's storage path (the sweep's `ray/`, or `URI/ray`), where every trial
    checkpoints from whichever node runs it."""
    per_trial = trial_resources(settings, trial_memory(sweep) if not settings.workers_per_trial else 0.0)
    require_resources([per_trial] * max(1, settings.workers_per_trial), "one trial",
                      sweep.config(TrainConfig).wait_for_resources_s)
    path = f"{storage}/{EXPERIMENT}"
    # Optuna's and Tune's own lines (a study created in memory, Tune's configuration box, a
    # TensorBoard hint into Ray's session folder) go to the sweep's log, as Ray's logs do; the
    # console keeps our progress bar and report.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming the sweep in %s (finished trials are kept, unfinished ones continue)", path)
        tuner = tune.Tuner.restore(path, trainable=trainable(sweep, settings), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False,
                                   param_space={p.key: p.to_tune() for p in space})
    else:
        tuner = build_tuner(sweep, settings, space, storage, callbacks)
    with contextlib.redirect_stdout(LogLines(logging.getLogger("ray.tune"))):
        return tuner.fit()


class LogLines(io.TextIOBase):
    """A text stream whose lines go to a logger (at INFO), for libraries that print."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)


class TrialProgress(tune.Callback):
    """One progress bar for the sweep (trials done, best validation MRR so far), in place of
    Tune's status tables."""

    def __init__(self, trials: int) -> None:
        self.trials, self.best, self.bar = trials, float("-inf"), None

    def setup(self, **info: Any) -> None:
        self.bar = tqdm(total=self.trials, desc="sweep", unit="trial")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        if result.get(METRIC, float("-inf")) > self.best:
            self.best = result[METRIC]
            self.bar.set_postfix_str(f"best val MRR {self.best:.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.bar.update(1)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.bar.update(1)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.bar.close()


# ---------------------------------------------------------------- results


def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def trial_table(results, space: list[Param], max_t: int) -> pd.DataFrame:
    """One row per trial: its draws, status, epochs run, best epoch and validation metrics."""
    rows = []
    for result in results:
        history = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path or "?").name
        row: dict[str, Any] = {"trial_id": trial_id, **{p.key: config.get(p.key) for p in space}}
        if len(history) and METRIC in history:
            best = history.loc[history[METRIC].idxmax()]
            epochs_run = int(history["epoch"].max())
            budget = int(config.get("optim.epochs", max_t))
            row.update({"val_mrr": best[METRIC], "val_recall_at_1": best.get("val_recall_at_1"),
                        "val_cos": best.get("val_cos"), "best_epoch": int(best["epoch"]), "epochs_run": epochs_run,
                        "trial_epochs": len(history)})
            finished = bool(history["finished"].iloc[-1]) if "finished" in history else epochs_run >= budget
            row["status"] = "errored" if result.error else ("finished" if finished else "stopped early")
        else:
            row.update({"epochs_run": 0, "trial_epochs": 0, "status": "errored" if result.error else "not run"})
        row["error"] = _error_line(result.error)
        row["_result"] = result
        rows.append(row)
    table = pd.DataFrame(rows)
    # the metric columns exist though no trial reported one (then every trial errored or never ran)
    return table.assign(**{c: math.nan for c in ("val_mrr", "val_recall_at_1", "val_cos", "best_epoch")
                           if c not in table})


def best_checkpoint_dir(result) -> Any:
    """The best-validation checkpoint of a trial (a Tune checkpoint, or its Train run's)."""
    from ray.train import Checkpoint

    best = result.get_best_checkpoint(METRIC, "max") if result.best_checkpoints else None
    if best is not None:
        return best
    history = result.metrics_dataframe
    if history is not None and "checkpoint_path" in history:
        rows = history.dropna(subset=["checkpoint_path"])
        if len(rows):
            return Checkpoint(rows.loc[rows[METRIC].idxmax(), "checkpoint_path"])
    raise RuntimeError(f"trial {result.path} reported no checkpoint")


def link_inputs(sweep: RunDir, run: RunDir) -> None:
    """A run folder inside the sweep reads the sweep's teacher, split and bank where they are."""
    (run.path / "teacher.json").write_bytes((sweep.path / "teacher.json").read_bytes())
    info = sweep.split_info()
    root = sweep.split().root if "://" in info["root"] else str(Path(sweep.split().root).resolve())
    write_json(run.path / "split.json", {**info, "root": root})
    if (sweep.path / "bank.json").is_file():
        bank = sweep.bank_root()
        write_json(run.path / "bank.json", {**json.loads((sweep.path / "bank.json").read_text()),
                                            "root": bank if "://" in bank else str(Path(bank).resolve())})


def publish_best(sweep: RunDir, result, params: dict[str, Any]) -> RunDir:
    """SWEEP_DIR/best: a complete run folder of the winning trial, which `cube serve`, `cube eval`
    and `cube analyze` take as they are, and best_config.yaml, which `cube train --config` takes."""
    base = to_dict(sweep.config(TrainConfig))
    cfg = trial_config(TrainConfig, base, params)
    save_config(cfg, sweep.path / "best_config.yaml")
    best = RunDir(sweep.path / "best")
    best.path.mkdir(exist_ok=True)
    save_config(cfg, best.path / "config.yaml")
    link_inputs(sweep, best)
    with best_checkpoint_dir(result).as_directory() as d:
        publish(d, best.model_dir)
    history = result.metrics_dataframe
    keep = [c for c in history.columns if c == "epoch" or c.startswith(("loss_", "val_", "train_"))
            or c in ("grad_norm", "samples_per_s", "lr", "peak_memory_mb")]
    history[keep].to_csv(best.path / "metrics.csv", index=False)
    return best


def trial_cost(cfg: TrainConfig, embed_dim: int, repeats: int = 20) -> tuple[int, float]:
    """(parameter count, median ms to answer one question on this process's CPU threads).

    Measured after the sweep, one trial at a time, so trials running side by side do not skew it."""
    import time

    from cube.eval.inference import predict
    from cube.model import count_parameters

    model = build_model(cfg.cube, torch.zeros(embed_dim), torch.zeros(embed_dim)).eval()
    q = torch.randn(1, embed_dim)
    predict(model, q)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(model, q)
        times.append(time.perf_counter() - start)
    return count_parameters(model), 1000.0 * sorted(times)[len(times) // 2]


def write_settings(sweep: RunDir, settings: TuneConfig, space_files: list[Path]) -> None:
    (sweep.path / "tune.yaml").write_text(yaml.safe_dump({**to_dict(settings), "spaces": [str(p) for p in space_files]},
                                                         sort_keys=False), encoding="utf-8")


def read_settings(sweep: RunDir) -> tuple[TuneConfig, list[Path]]:
    from cube.config import from_dict

    data = yaml.safe_load((sweep.path / "tune.yaml").read_text(encoding="utf-8"))
    spaces = [Path(p) for p in data.pop("spaces")]
    return from_dict(TuneConfig, data), spaces


def robustness(sweep: RunDir, cfg: TrainConfig, seeds: int, baselines_fitted, device: str = "cpu") -> dict:
    """The winner retrained from scratch with `seeds` seeds: test MRR mean ± std beside the
    baselines fit on the same split (the MLP with the same number of seeds)."""
    import dataclasses

    import numpy as np

    from cube.eval.inference import score_held_out
    from cube.eval.report import run_train_data, score_baselines

    split, info = sweep.split(), sweep.split_info()
    val = split.held_out("val", questions=cfg.val_questions, seed=cfg.data.seed)
    test = split.held_out("test", questions=cfg.eval_questions, seed=cfg.data.seed)
    mrrs = []
    for seed in range(seeds):
        run_cfg = dataclasses.replace(cfg, seed=seed)
        model = build_model(run_cfg.cube, torch.tensor(info["q_mean"]), torch.tensor(info["a_mean"]), device, seed)
        batches = split.shuffled("train", run_cfg.optim.batch_size, seed, buffer=TRIAL_SHUFFLE_BUFFER)
        fit(model, batches, val, run_cfg.loss, run_cfg.optim, seed=seed,
            steps_per_epoch=info["rows"]["train"] // run_cfg.optim.batch_size)
        mrrs.append(score_held_out(model, test)["mrr"])
        log.info("robustness: seed %d test MRR %.3f", seed, mrrs[-1])
    base = score_baselines(baselines_fitted, run_train_data(sweep).centering, test)
    best = base["best_baseline"]
    return {"seeds": seeds, "cube_test_mrr": mrrs, "cube_test_mrr_mean": float(np.mean(mrrs)),
            "cube_test_mrr_std": float(np.std(mrrs)), "baselines_test": base["baselines"], "best_baseline": best,
            "cube_minus_best": float(np.mean(mrrs)) - base["baselines"][best]["mrr"], "pool_size": len(test.pool)}


def write_best_eval(best: RunDir, fitted) -> dict:
    from cube.eval.report import evaluate_run

    report = evaluate_run(best.path, fitted=fitted)
    write_json(best.path / "eval.json", report)
    return report


def scored_error(table: pd.DataFrame) -> str:
    errors = [e for e in table.get("error", pd.Series(dtype=str)).tolist() if isinstance(e, str) and e]
    return f"the first: {errors[0]}" if errors else "none reported an error"


def finish(sweep: RunDir, settings: TuneConfig, space: list[Param], results) -> dict[str, Any]:
    """Table, costs, report, the winner's run folder, its test evaluation and robustness."""
    from cube.eval.baselines import MLPRecipe, fit_baselines
    from cube.eval.report import run_train_data, score_baselines
    from jobs.sweep_report import write_report

    cfg = sweep.config(TrainConfig)
    base = to_dict(cfg)
    table = trial_table(results, space, max_epochs(base, space))
    _, dim = sweep.teacher()
    costs = {}
    for i, row in table.iterrows():
        try:
            costs[i] = trial_cost(trial_config(TrainConfig, base, {p.key: row[p.key] for p in space}), dim)
        except ValueError:
            continue  # an invalid combination: it errored, and has no size
    table["params"] = pd.Series({i: c[0] for i, c in costs.items()}, dtype=float)
    table["latency_ms"] = pd.Series({i: c[1] for i, c in costs.items()}, dtype=float)
    train = run_train_data(sweep)
    val = sweep.split().held_out("val", questions=cfg.val_questions, seed=cfg.data.seed)
    fitted = fit_baselines(train, val, max(1, settings.robustness_seeds), cfg.baselines,
                           MLPRecipe(threads=cfg.baseline_threads))
    baselines_val = {k: v["mrr"] for k, v in score_baselines(fitted, train.centering, val)["baselines"].items()}
    scored = table.dropna(subset=["val_mrr"])
    if not len(scored):
        write_report(sweep.path, table.drop(columns="_result"), space, baselines_val, to_dict(settings))
        first = scored_error(table)
        raise SweepError(f"no trial of the sweep reported a result ({first}); see every trial's error in "
                         f"{sweep.path / 'results.csv'}")
    winner = table.loc[scored["val_mrr"].idxmax()]
    params = {p.key: winner[p.key] for p in space}
    best = publish_best(sweep, winner["_result"], params)
    best_eval = write_best_eval(best, fitted)
    lines = [f"best trial {winner['trial_id']}: val MRR {winner['val_mrr']:.3f} with "
             + ", ".join(f"{k}={v}" for k, v in params.items()),
             f"test MRR {best_eval['cube']['mrr']:.3f} (pool {best_eval['pool_size']}) vs best baseline "
             f"{best_eval['best_baseline']} {best_eval['baselines'][best_eval['best_baseline']]['mrr']:.3f}"]
    if settings.robustness_seeds:
        check = robustness(sweep, load_config(TrainConfig, sweep.path / "best_config.yaml"),
                           settings.robustness_seeds, fitted)
        write_json(sweep.path / "robustness.json", check)
        lines.append(
            f"robustness ({check['seeds']} seeds, retrained from scratch): test MRR "
            f"{check['cube_test_mrr_mean']:.3f} ± {check['cube_test_mrr_std']:.3f} vs {check['best_baseline']} "
            f"{check['baselines_test'][check['best_baseline']]['mrr']:.3f} ({check['cube_minus_best']:+.3f})"
        )
    text = "\n".join(lines)
    report = write_report(
        sweep.path,
        table.drop(columns="_result"),
        space,
        baselines_val,
        to_dict(settings),
        extra="## The winner\n\n" + text.replace("\n", "\n\n") + "\n\n`cube train --config best_config.yaml` "
        "retrains it; `cube serve --run best` serves it.",
    )
    return {"text": f"{text}\nreport: {report}\nbest config: {sweep.path / 'best_config.yaml'}  run: {best.path}",
            "best_eval": best_eval}
