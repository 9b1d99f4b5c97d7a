"""Serve a trained run over HTTP with Ray Serve until interrupted.

    python -m jobs.serve --run runs/demo --port 8000
    curl -s localhost:8000/v1/answer -d '{"question": "Why is the sky blue?"}'
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from jobs.common import add_verbose_flag, ensure_ray, run_main, setup_logging

log = logging.getLogger("cube.serve")


def start(run_dir: Path, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app for `run_dir`; returns its base URL once every replica is up."""
    from ray import serve

    from serve.app import build_app

    app = build_app({"run_dir": str(run_dir)})  # validates the run before Ray is touched
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="cube", route_prefix="/")
    url = f"http://{host}:{port}"
    log.info("serving %s at %s (POST /v1/answer, GET /healthz)", run_dir, url)
    return url


def stop() -> None:
    from ray import serve

    serve.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder written by `cube train`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept remote clients)")
    p.add_argument("--port", type=int, default=8000)
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    start(args.run, args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
