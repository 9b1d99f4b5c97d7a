"""Score a trained run on held-out pairs against every baseline, fit on the run's training split.

    python -m jobs.eval --run runs/demo                 # the run's own test split
    python -m jobs.eval --run runs/demo --data new.jsonl --json   # every row of another file

Prints a table (or JSON with --json) of cosine, recall@1, recall@5 and MRR for the cube and
for identity, mean answer, ridge and MLP baselines (raw and centred), with the pool size and
chance level, then five held-out examples.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import yaml

from cube.checkpoint import load_checkpoint
from cube.config import from_dict
from cube.data import DataConfig, DataError, load_qa
from cube.evaluate import HeldOut, compare, format_report
from cube.rundir import RunDir
from jobs.common import setup_logging

log = logging.getLogger("cube.eval")


def evaluate_run(run_path: Path, data: Path | None = None) -> dict:
    """The comparison report for a run (its test split, or every row of `data`)."""
    run = RunDir(run_path)
    run.require("model", "split.parquet", "teacher.json", "config.yaml")
    teacher, _ = run.teacher()
    model, _ = load_checkpoint(run.model_dir, expected_teacher=teacher.identity())
    pairs = run.data()
    settings = yaml.safe_load((run.path / "config.yaml").read_text())
    if data is None:
        df, q, a = pairs.part("test")
        source = f"{run.path}/split.parquet (test split)"
    else:
        from jobs.embed import PipelineOptions, embed_pairs

        df = load_qa(data, from_dict(DataConfig, settings.get("data", {})))
        q, a = embed_pairs(df, teacher, from_dict(PipelineOptions, settings.get("pipeline", {})))
        source = f"{data} (all rows)"
    report = compare(model, pairs.split("train"), pairs.split("val"), HeldOut.from_frame(df, q, a),
                     seed=int(settings.get("seed", 0)))
    report["evaluated_on"] = source
    report["teacher"] = teacher.identity()
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder written by `cube train`")
    p.add_argument("--data", type=Path, help="evaluate on every row of this Q&A file instead of the run's test split")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        report = evaluate_run(args.run, args.data)
    except DataError as e:
        raise SystemExit(f"data error: {e}") from None
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
