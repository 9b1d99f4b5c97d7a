"""`cube <command>`: one entry point for every job; each is also `python -m jobs.<command>`."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

COMMANDS = {
    "demo": "the whole pipeline on the shipped data: embed, train, evaluate, serve, ask",
    "embed": "embed a Q&A file into a resumable Parquet embedding store (Ray Data)",
    "train": "train the cube on a Q&A file with Ray Train, then evaluate it",
    "tune": "search cube sizes and NCA/training settings with Ray Tune + Optuna",
    "decoder": "train a run's answer writer: a language model that writes text from an embedding",
    "eval": "compare a trained run with the baselines on held-out pairs",
    "serve": "answer questions over HTTP with Ray Serve",
    "analyze": "emergent-pattern report of a trained run (activity, structure, ablations, damage)",
    "cluster": "start/stop a multi-node Ray cluster on this machine (loopback), for trying multi-node jobs",
}


def cube_version() -> str:
    try:
        return version("cube")
    except PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "unknown (not installed; run `make setup`)"


def usage() -> str:
    lines = ["usage: cube <command> [options]   (cube <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "  --version  print the version and exit"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jobs.common import run_main

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"cube {cube_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"cube: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    job = importlib.import_module(f"jobs.{command}")
    return run_main(job.main, rest)


if __name__ == "__main__":
    raise SystemExit(main())
