"""Train the cube with Ray Train: embed (cached) → TorchTrainer (DDP) → best checkpoint → held-out report.

    python -m jobs.train --data data/qa.jsonl --output runs/demo --set optim.epochs=5
    python -m jobs.train --resume runs/demo      # continue an interrupted run from its last epoch
    python -m jobs.train --data data/qa.jsonl --output runs/best --config SWEEP_DIR/best_config.yaml

Each worker reads its shard of the training split through Ray Data once, trains with gloo (CPU)
or NCCL (GPU), and rank 0 reports a checkpoint every epoch. The run folder layout is described
in cube/data/rundir.py; the Ray side lives in jobs/trainer.py.
"""

from __future__ import annotations

import argparse

from cube.data.storage import LOG, Storage
from cube.eval.report import format_report
from cube.job_config import TrainConfig
from jobs.common import add_config_flags, config_from_args, run_main, setup_logging
from jobs.trainer import train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="Q&A pairs: a JSONL, CSV or Parquet file, or a folder of Parquet files; a path or a "
                                  "file://, s3:// or gs:// URI (question/answer columns; see docs/data.md)")
    p.add_argument("--output", help="run folder to create (must be empty or absent): a path, or a storage URI "
                                    "(s3://…, gs://…, file://…) that every node of a cluster can reach")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run (path or URI) from its last checkpoint"
    )
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, Storage.of(args.resume or args.output or ".").local / LOG)
    if args.resume:
        if args.data or args.output or args.config or args.overrides:
            parser.error("--resume takes only the run folder: its config and data are already in it")
        report = train(None, args.resume, None, resume=True)
    else:
        if not (args.data and args.output):
            parser.error("--data and --output are required (or --resume RUN_DIR)")
        report = train(args.data, args.output, config_from_args(TrainConfig, args))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
