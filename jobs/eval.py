"""Score a trained run on held-out pairs against every baseline, fit on the run's training split.

    python -m jobs.eval --run runs/demo                 # the run's own test split
    python -m jobs.eval --run runs/demo --data new.jsonl --json   # every row of another file
    python -m jobs.eval --run runs/demo --generate      # + the generation table (after `cube decoder`)

Prints a table (or JSON with --json) of cosine, recall@1, recall@5 and MRR for the cube and
for identity, mean answer, ridge and MLP baselines (raw and centred; the MLP as the mean of 3
seeds), with the pool size and chance level, then five held-out examples. Every question is
ranked against the distinct answers of the evaluated pairs.

With --generate (a run with a trained decoder, `cube decoder --run RUN`), it also writes text for
a sample of test questions from the true answer's embedding, the cube's prediction and the
strongest baseline's, beside the LM's own chat answer and retrieval, scores each (ROUGE-L,
teacher cosine, recall@1 of the text, tokens/s; cube/decoder/generation.py) and saves the
table as RUN/generation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cube.data.qa import load_qa
from cube.data.rundir import RunDir
from cube.data.storage import Storage
from cube.eval.baselines import parse_baselines
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
    p.add_argument("--baselines", metavar="LIST",
                   help="baselines to fit and report: all, or a comma list such as identity,ridge "
                        "(default: the run's own `baselines` setting; the MLPs take most of the time)")
    p.add_argument("--generate", action="store_true",
                   help="also score answer generation (needs RUN/decoder from `cube decoder`); "
                        "writes RUN/generation.json")
    p.add_argument("--generate-questions", type=int, default=64, metavar="N",
                   help="test questions to write answers for (a seeded sample; default 64: about 10 min on 2 CPU cores "
                        "with SmolLM2)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens each generated answer may have (default 64)")
    p.add_argument("--no-chat", action="store_true", help="leave the LM's own chat answers out of the table")
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.baselines is not None:
        parse_baselines(args.baselines)  # a bad name fails before anything is loaded
    with Storage.of(args.run).reading() as path:
        if args.data is None:
            report = evaluate_run(path, baselines=args.baselines)
        else:
            run = RunDir(path)
            run.require("model")
            report = evaluate_run(path, held_out_file(run, args.data), source=f"{args.data} (all rows)",
                                  baselines=args.baselines)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.generate:
        from cube.data.rundir import write_json
        from cube.decoder.generation import format_generation, generation_report

        if args.data is not None or "://" in args.run:
            raise SystemExit("--generate scores the run's own test split in a local run folder; drop --data")
        if args.generate_questions < 1 or not 1 <= args.max_new_tokens <= 1024:
            raise SystemExit("--generate-questions must be >= 1 and --max-new-tokens in [1, 1024]")
        table = generation_report(args.run, args.generate_questions, args.max_new_tokens, chat=not args.no_chat)
        write_json(Path(args.run) / "generation.json", table)
        print(json.dumps(table, indent=2) if args.json else "\n" + format_generation(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
