"""Emergent-pattern report of a trained run, on its held-out questions (no Ray needed).

    python -m jobs.analyze --run runs/demo        # writes runs/demo/analysis/report.md + PNGs

Activity maps, spatial autocorrelation (Moran's I) against shuffled positions, cell
specialisation, information flow (MRR when each depth layer's update is frozen), stability at
2T and 4T steps, and damage (a zeroed 3×3×3 block halfway through) over many trials.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import numpy as np

from cube.data.rundir import RunDir, write_json
from cube.data.storage import Storage
from cube.eval.analysis import analyse, write_report
from cube.job_config import TrainConfig
from cube.train.checkpoint import load_checkpoint
from jobs.common import add_verbose_flag, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="run folder written by `cube train`: a path or a storage URI")
    p.add_argument("--output", help="report folder, a path or a URI (default: RUN/analysis)")
    p.add_argument("--damage-trials", type=int, default=20, help="random damaged blocks to average over (default 20)")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with Storage.of(args.run).reading() as path:
        run = RunDir(path)
        run.require("model", "split.json", "teacher.json")
        teacher, _ = run.teacher()
        model, _ = load_checkpoint(run.model_dir, expected_teacher=teacher.identity())
        cfg = run.config(TrainConfig)
        held_out = run.split().held_out("test", questions=cfg.eval_questions, seed=cfg.data.seed)
    result = analyse(model, held_out, damage_trials=args.damage_trials)
    store = Storage.of(args.output or f"{args.run.rstrip('/')}/analysis")
    store.reset()
    path = write_report(result, store.local, args.run)
    write_json(
        store.local / "analysis.json",
        {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(result).items()},
    )
    store.push()
    print(f"report: {store}/{path.name}" if store.remote else f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
