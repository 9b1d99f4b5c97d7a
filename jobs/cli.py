"""`cube <command>`: one entry point for every job; each is also `python -m jobs.<command>`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "the whole pipeline on the shipped data: embed, train, evaluate, serve, ask",
    "embed": "embed a Q&A file into a resumable Parquet embedding store (Ray Data)",
    "train": "train the cube on a Q&A file with Ray Train, then evaluate it",
    "eval": "compare a trained run with the baselines on held-out pairs",
    "serve": "answer questions over HTTP with Ray Serve",
    "analyze": "emergent-pattern report of a trained run (activity, structure, ablations, damage)",
}


def usage() -> str:
    lines = ["usage: cube <command> [options]   (cube <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"cube: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    job = importlib.import_module(f"jobs.{command}")
    from cube.rundir import RunError

    try:
        return job.main(rest)
    except RunError as e:  # a --run folder that is not a (finished) run: the message says what to do
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    raise SystemExit(main())
