"""Embed a Q&A file with a teacher through Ray Data, into a resumable Parquet embedding store.

    read file ─▶ texts + ids ─▶ SkipDone ─▶ TeacherActor (actor pool) ─▶ PartSink (atomic parts)

The file is streamed, never held in memory; the teacher loads once per actor; every block
becomes its own Parquet part, written under a temporary name and renamed into place. Kill a
run halfway and rerun it: finished parts stay, and only texts no part holds are embedded.

With --generate-answers the file needs only questions: an instruct teacher writes an answer
for each (greedy, bounded length), stored in OUTPUT/generated/ with the generator's name, and
collected into OUTPUT/qa.parquet, which `cube train --data` accepts.

    cube embed data/qa.jsonl --output emb/ --teacher smollm2 --concurrency 2 --batch-size 32
    cube embed questions.jsonl --output gen/ --generate-answers --generator smollm2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cube.data.storage import LOG, Storage
from cube.job_config import EmbedConfig
from jobs.common import add_config_flags, config_from_args, run_main, setup_logging
from jobs.embedding import embed_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("input", type=Path, help="JSONL, CSV or Parquet with question (and answer) columns")
    p.add_argument("--output", required=True, help="store folder (created; a rerun adds only new texts): a path or a "
                                                   "storage URI (s3://…, gs://…, file://…)")
    p.add_argument("--teacher", help="minilm | smollm2 | a Hugging Face id | a local folder (= --set teacher.name=...)")
    p.add_argument(
        "--quantize",
        choices=["none", "8bit", "4bit"],
        help="load the teacher through bitsandbytes (= --set teacher.quantize=...)",
    )
    p.add_argument(
        "--pooling",
        choices=["mean", "last"],
        help="mean over real tokens or the last one (= --set teacher.pooling=...)",
    )
    p.add_argument("--concurrency", type=int, help="teacher actors in the pool (= --set pipeline.concurrency=...)")
    p.add_argument("--batch-size", type=int, help="texts per teacher call (= --set pipeline.batch_size=...)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (= --set pipeline.num_gpus=...)")
    p.add_argument(
        "--cpus-per-actor", type=float, help="CPUs each actor reserves (= --set pipeline.cpus_per_actor=...)"
    )
    p.add_argument(
        "--threads-per-actor",
        type=int,
        help="torch threads per actor; default: the node's cores shared between actors "
        "(= --set pipeline.threads_per_actor=...)",
    )
    p.add_argument("--generate-answers", action="store_true", help="have an instruct teacher write the answers first")
    p.add_argument("--generator", help="chat model that writes answers (= --set generator.name=...; default smollm2)")
    add_config_flags(p)
    return p


def config_from_cli(args: argparse.Namespace) -> EmbedConfig:
    """The named flags are shorthands for --set overrides; explicit --set wins."""
    sugar = {"teacher.name": args.teacher, "teacher.quantize": args.quantize, "teacher.pooling": args.pooling,
             "pipeline.concurrency": args.concurrency, "pipeline.batch_size": args.batch_size,
             "pipeline.num_gpus": args.num_gpus, "pipeline.cpus_per_actor": args.cpus_per_actor,
             "pipeline.threads_per_actor": args.threads_per_actor,
             "generator.name": args.generator,
             "generate_answers": "true" if args.generate_answers else None}
    args.overrides = [f"{k}={v}" for k, v in sugar.items() if v is not None] + args.overrides
    return config_from_args(EmbedConfig, args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = Storage.of(args.output)
    setup_logging(args.verbose, store.local / LOG)
    cfg = config_from_cli(args)
    store.pull()  # the parts already there, so that only new texts are embedded
    try:
        summary = embed_file(args.input, store.local, cfg)
    finally:
        store.push()
    print(f"{store}: {summary['rows']} rows, {summary['texts_in_store']} texts in the store "
          f"({summary['embedded_now']} embedded now), {summary['truncated']} truncated at "
          f"teacher.max_length={summary['max_length']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
