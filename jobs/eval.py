"""Score a trained run on held-out pairs against every baseline, fit on the run's training split.

    python -m jobs.eval --run runs/demo                 # the run's own test split
    python -m jobs.eval --run runs/demo --data new.jsonl --json   # every row of another file

Prints a table (or JSON with --json) of cosine, recall@1, recall@5 and MRR for the cube and
for identity, mean answer, ridge and MLP baselines (raw and centred; the MLP as the mean of 3
seeds), with the pool size and chance level, then five held-out examples. Every question is
ranked against the distinct answers of the evaluated pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cube.data.qa import load_qa
from cube.data.rundir import RunDir
from cube.data.storage import Storage
from cube.eval.metrics import HeldOut
from cube.eval.report import evaluate_run, format_report
from cube.job_config import TrainConfig
from jobs.common import add_verbose_flag, run_main, setup_logging


def held_out_file(run: RunDir, data: str | Path) -> HeldOut:
    """Every row of `data`, embedded with the run's own teacher and pipeline settings.

    Raises:
        TeacherError: the teacher's vectors are not of the run's dimension (a run trained on
            brought embeddings, and a teacher.name that does not match them)."""
    from cube.teachers import TeacherError
    from jobs.embedding import embed_pairs

    cfg = run.config(TrainConfig)
    teacher, dim = run.teacher()
    df = load_qa(data, cfg.data)
    q, a = embed_pairs(df, teacher, cfg.pipeline)
    if q.shape[1] != dim:
        raise TeacherError(f"teacher {teacher.name!r} makes {q.shape[1]}-D vectors, but run {run.path} was trained on "
                           f"{dim}-D ones; train with --set teacher=<the model that made its embeddings>")
    return HeldOut.from_frame(df, q, a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="run folder written by `cube train`: a path or a storage URI")
    p.add_argument("--data", help="evaluate on every row of this Q&A file instead of the run's test split")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    with Storage.of(args.run).reading() as path:
        if args.data is None:
            report = evaluate_run(path)
        else:
            run = RunDir(path)
            run.require("model")
            report = evaluate_run(path, held_out_file(run, args.data), source=f"{args.data} (all rows)")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
