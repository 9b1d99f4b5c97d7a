"""What every Ray entrypoint shares: connecting to Ray, config flags, logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TypeVar

from cube.config import load_config

T = TypeVar("T")
log = logging.getLogger("cube")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in $RAY_ADDRESS, or start an embedded local one (the laptop case).

    An embedded cluster keeps the dashboard on: Tune needs it to free the placement groups of
    Train trials that it stops early (without it the next trial waits forever).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address)
    else:
        log.info("starting an embedded local Ray cluster (set RAY_ADDRESS to use an existing one)")
        # address="local": always a fresh cluster, never a stale one left in /tmp/ray by a crash.
        ray.init(address="local", num_cpus=num_cpus)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with config values (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.epochs=5 --set teacher=smollm2 (repeatable)")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The job config from --config and --set; a bad key or value exits with its message."""
    try:
        return load_config(cls, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"config error: {e}") from None
