"""Serve a trained run over HTTP with Ray Serve until interrupted.

    cube serve --run runs/demo --port 8000 [--answers more.jsonl] [--config serve.yaml] [--set limits.max_top_k=50]
    curl -s localhost:8000/v1/answer -H 'content-type: application/json' -d '{"question": "Why is the sky blue?"}'
    open http://127.0.0.1:8000/  (a page that asks, compares and shows the cube's layers)

The bank holds every distinct answer of the run (all splits) plus those of --answers. Serve
settings (replicas, CPUs/GPUs, batching, queue limits, request limits) are in serve/settings.py;
docs/serving.md lists the API. Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import requests

from jobs.common import add_verbose_flag, ensure_ray, route_ray_logs, run_main, setup_logging

log = logging.getLogger("cube.serve")
APP_NAME = "cube"


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """GET /healthz until it answers 200; returns its body.

    Raises:
        TimeoutError: not healthy within `timeout_s`, with the last answer.
    """
    deadline, last = time.time() + timeout_s, "no answer"
    while time.time() < deadline:
        try:
            r = requests.get(f"{url}/healthz", timeout=10)
            if r.status_code == 200:
                return r.json()
            last = f"{r.status_code} {r.text[:200]}"
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:g} s (last: {last})")


def embed_extra_answers(run_dir: str | Path, answers: Path) -> None:
    """Embed the answers of `answers` that the run teacher's store lacks (a Ray Data job), so that
    the replicas only read their vectors. A second start embeds nothing."""
    from cube.data.rundir import RunDir
    from cube.data.storage import Storage
    from cube.job_config import PipelineOptions
    from jobs.embedding import embed_texts
    from serve.bank import read_answers

    with Storage.of(run_dir).reading() as path:
        teacher, _ = RunDir(path).teacher()
    texts = read_answers(answers)
    # A sliver of a CPU: this may run while a previous version of the app still holds its replicas.
    opts = PipelineOptions(concurrency=1, batch_size=64, cpus_per_actor=0.25, threads_per_actor=1)
    folder = embed_texts(texts, teacher, opts)
    log.info("extra answers: %d distinct in %s, vectors in %s", len(texts), answers, folder)


def start(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    answers: Path | None = None,
    config: Path | None = None,
    settings: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> str:
    """Deploy the app for `run_dir`; returns its base URL once /healthz answers 200.

    `settings` is a nested mapping of serve settings and `overrides` are `key=value` strings,
    both on top of `config` (serve/settings.py). Serve's HTTP options (host, port, proxy
    timeout) apply when this starts Serve; a Serve already running keeps its own.
    """
    from ray import serve

    from cube.config import to_dict
    from cube.data.rundir import RunDir
    from cube.data.storage import is_uri
    from serve.app import build_app
    from serve.settings import load_settings

    # Checked before Ray is touched: the run folder and the settings.
    if not is_uri(run_dir):  # a URI is checked by build_app, on the copy it reads
        RunDir(run_dir).require("model", "bank.json", "teacher.json")
    cfg = load_settings(config, settings, overrides)
    args: dict[str, Any] = {"run_dir": str(run_dir), "settings": to_dict(cfg)}
    if answers is not None:
        args["answers"] = str(answers)
    ensure_ray()
    route_ray_logs()  # importing Serve gave its driver-side logger a console handler of its own
    if answers is not None:
        embed_extra_answers(run_dir, answers)
    app = build_app(args)
    # The proxy's own timeout backs up the API's (limits.request_timeout_s, answered with 504).
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.limits.request_timeout_s + 5})
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    health = wait_healthy(url)
    log.info("serving %s (%s, %d answers) at %s: open it in a browser, or POST /v1/answer",
             run_dir, health["model_version"], health["bank_size"], url)
    return url


def stop() -> None:
    from ray import serve

    serve.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", required=True, help="run folder written by `cube train`: a path or a storage URI "
                                                "(each replica reads its own copy)")
    p.add_argument("--answers", type=Path, help="JSONL/CSV/Parquet file whose `answer` column joins the bank")
    p.add_argument("--config", type=Path, help="YAML file of serve settings (see serve/settings.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one serve setting, e.g. embedder.num_replicas=2 (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept remote clients)")
    p.add_argument("--port", type=int, default=8000)
    add_verbose_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    start(args.run, args.host, args.port, answers=args.answers, config=args.config, overrides=args.overrides)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("shutting down")
        stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
