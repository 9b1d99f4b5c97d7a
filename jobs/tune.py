"""Search cube sizes, NCA settings and training settings with Ray Tune + Optuna.

    cube tune --data data/qa.jsonl --space tune_spaces/nca.yaml --space tune_spaces/training.yaml \\
              --trials 40 --output sweeps/nca [--cpus-per-trial 1] [--gpus-per-trial 0.25] \\
              [--max-concurrent 4] [--scheduler asha|fifo] [--search tpe|random] [--seed 0] \\
              [--config base.yaml] [--set key=value ...]
    cube tune --resume sweeps/nca          # after the driver died: finished trials are not rerun

The data is embedded once (cached); every trial reads vectors, trains in its own process (or,
with --workers-per-trial N, as a Ray Train run of N workers), and reports validation MRR every
epoch, which ASHA uses to stop weak trials. Selection is by validation MRR only; the test split
is touched once, for the winner. SWEEP_DIR then holds results.csv/.md (every trial: draws,
status, parameters, latency, best epoch, validation metrics), pareto.png, importance.png,
history.png, best_config.yaml (for `cube train --config`), best/ (a run folder for `cube serve`,
`cube eval`, `cube analyze`) and robustness.json (the winner retrained with 3 seeds against the
baselines).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from cube.data.rundir import RunDir, RunError
from cube.data.storage import LOG, Storage
from cube.eval.report import format_report
from cube.job_config import TrainConfig, TuneConfig
from jobs.common import add_config_flags, config_from_args, ensure_ray, run_main, setup_logging
from jobs.search_space import load_space

log = logging.getLogger("cube.tune")
FLAGS = {  # command-line flag → TuneConfig field
    "trials": int, "max_concurrent": int, "cpus_per_trial": float, "gpus_per_trial": float, "workers_per_trial": int,
    "scheduler": str, "search": str, "seed": int, "grace_period": int, "robustness_seeds": int,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube tune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="Q&A pairs: a JSONL, CSV or Parquet file, or a folder of Parquet files; a path or a "
                                  "file://, s3:// or gs:// URI (question/answer columns; see docs/data.md)")
    p.add_argument(
        "--space", type=Path, action="append", default=[], help="search-space YAML (repeatable; see tune_spaces/)"
    )
    p.add_argument("--output", help="sweep folder to create: a path, or a storage URI (s3://…, gs://…, file://…) "
                                    "that every node of a cluster can reach")
    p.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep (path or URI) whose driver died")
    d = TuneConfig()
    p.add_argument("--trials", type=int, help=f"trials to run (default {d.trials})")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    p.add_argument("--cpus-per-trial", type=float, help=f"CPUs each trial reserves (default {d.cpus_per_trial:g})")
    p.add_argument(
        "--gpus-per-trial", type=float, help="GPUs each trial reserves, fractional to pack trials (default 0)"
    )
    p.add_argument(
        "--workers-per-trial", type=int, help="run each trial as a Ray Train run of N DDP workers (default: in-process)"
    )
    p.add_argument(
        "--scheduler", choices=["asha", "fifo"], help=f"early stopping on validation MRR (default {d.scheduler})"
    )
    p.add_argument("--search", choices=["tpe", "random"], help=f"Optuna TPE or random search (default {d.search})")
    p.add_argument("--seed", type=int, help="the searcher's seed (default 0)")
    p.add_argument("--grace-period", type=int, help=f"epochs before ASHA may stop a trial (default {d.grace_period})")
    p.add_argument(
        "--robustness-seeds",
        type=int,
        help=f"retrain the winner with N seeds, 0 to skip (default {d.robustness_seeds})",
    )
    add_config_flags(p)
    return p


def tune_config(args: argparse.Namespace) -> TuneConfig:
    from cube.config import from_dict

    return from_dict(TuneConfig, {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None})


def start(args: argparse.Namespace, store: Storage) -> tuple[RunDir, TuneConfig, list[Path]]:
    """Check everything, then embed once and write the sweep folder's inputs."""
    from jobs.sweep import write_settings
    from jobs.trainer import prepare_run, write_bank

    if not (args.data and args.output and args.space):
        raise SystemExit("cube tune: --data, --output and at least one --space are required (or --resume SWEEP_DIR)")
    load_space(args.space, TrainConfig)  # a bad space fails before anything is embedded
    settings = tune_config(args)
    cfg = config_from_args(TrainConfig, args)
    if settings.workers_per_trial and store.remote:
        raise ValueError("--workers-per-trial writes each trial's run folder beside the sweep's: give --output a path "
                         "on storage that every node mounts (NFS, EFS), not a URI")
    if store.exists("tune.yaml"):
        raise RunError(
            f"{store} already holds a sweep; pass --resume {store} to continue it, or choose another --output"
        )
    store.reset()
    sweep = RunDir(store.local)
    try:
        prepare_run(sweep, store, cfg, str(args.data))
        write_bank(sweep, store)  # the answers the winner's run folder (best/) serves
    except BaseException:
        store.discard()
        raise
    write_settings(sweep, settings, args.space)
    store.push()  # the inputs first: a sweep whose driver dies can be resumed from the URI
    return sweep, settings, args.space


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    store = Storage.of(args.resume or args.output or ".")
    setup_logging(args.verbose, store.local / LOG)
    # Every epoch checkpoints, so that a killed driver loses at most one epoch per trial; Tune
    # then warns on each snapshot that snapshots are frequent. That is the intent: silence it.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    from jobs.sweep import TrialProgress, finish, read_settings, run_sweep

    if args.resume:
        if args.data or args.output or args.space or args.config or args.overrides:
            parser.error("--resume takes only the sweep folder: its data, spaces and settings are already in it")
        store.pull()
        sweep = RunDir(store.local)
        sweep.require("tune.yaml", "config.yaml", "split.json", "teacher.json")
        settings, spaces = read_settings(sweep)
    else:
        sweep, settings, spaces = start(args, store)
    space = load_space(spaces, TrainConfig)
    try:
        ensure_ray()
        results = run_sweep(sweep, settings, space, resume=bool(args.resume), storage=store.ray_storage(),
                            callbacks=[TrialProgress(settings.trials)])
        summary = finish(sweep, settings, space, results)
    finally:
        store.push()
    print(summary["text"])
    print(format_report(summary["best_eval"]).split("\nexamples")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
