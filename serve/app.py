"""The Ray Serve app: HTTP question → teacher embedding → cube → best answers of the run's corpus.

    AnswerAPI (serve/ingress.py)        HTTP: validation, composition, timeouts, GET / page
      ├─ TeacherEmbedder (embedder.py)  the run's teacher, @serve.batch
      ├─ CubePredictor (predictor.py)   the cube + answer bank, @serve.batch; identity baseline; trace
      └─ Generator (generator.py)       text from the cube's prediction (the run's decoder, /v1/generate)
                                        and the teacher's own answer (/v1/compare; causal LMs only)

Each is its own deployment, so each scales apart (serve/settings.py: replicas, CPUs/GPUs,
batching, queue limits). Start it with `cube serve --run RUN_DIR`, `serve run serve/config.yaml`,
or `serve run serve.app:build_app run_dir=RUN_DIR`. docs/serving.md has the API.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray import serve

from cube.config import to_dict
from cube.data import store
from cube.data.rundir import RunDir
from cube.data.storage import Storage, is_uri
from cube.teachers import TeacherConfig
from serve.bank import read_answers
from serve.embedder import TeacherEmbedder
from serve.generator import Generator
from serve.ingress import AnswerAPI
from serve.predictor import CubePredictor
from serve.settings import DeploymentSettings, ServeConfig, load_settings

log = logging.getLogger("cube.serve")
ARGS = {
    "run_dir": "the run to serve: a folder written by `cube train` (or a sweep's best/)",
    "answers": "optional JSONL/CSV/Parquet file whose `answer` column joins the bank (embedded beforehand: "
               "`cube serve --answers FILE` does that)",
    "config": "optional YAML file of serve settings (serve/settings.py)",
    "settings": "optional inline serve settings, as in that file (a mapping of sections)",
}


def _live(s: DeploymentSettings) -> dict[str, Any]:
    """The user_config of a batched deployment: what `reconfigure` may change in place."""
    return {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s}


def compose(teacher: TeacherConfig, dim: int, target: str, cfg: ServeConfig, answers: str | None = None,
            store_folder: str | None = None) -> serve.Application:
    """Bind the four deployments for a checked run of `teacher` (read from `target`, its path or
    URI, by each predictor replica on its own node) with settings `cfg`."""
    # Old replicas finish their requests during a redeploy (a swap to another run) before they go.
    drain = {"graceful_shutdown_timeout_s": cfg.limits.request_timeout_s + 5}
    embedder = TeacherEmbedder.options(**cfg.embedder.options(), **drain, user_config=_live(cfg.embedder)).bind(
        to_dict(teacher), to_dict(cfg.embedder), dim)
    predictor = CubePredictor.options(**cfg.predictor.options(), **drain, user_config=_live(cfg.predictor)).bind(
        target, answers, store_folder, to_dict(cfg.predictor), to_dict(cfg.search))
    decoder_dir = None if is_uri(target) else str(Path(target) / "decoder" / "model")
    generator = Generator.options(**cfg.generator.options(), **drain, user_config=_live(cfg.generator)).bind(
        to_dict(teacher), cfg.limits.generation_max_new_tokens, to_dict(cfg.generator), decoder_dir)
    return AnswerAPI.options(**cfg.api.options(), **drain).bind(embedder, predictor, generator, to_dict(cfg.limits))


def build_app(args: dict[str, Any]) -> serve.Application:
    """App builder for `serve run serve.app:build_app run_dir=RUN_DIR`, serve/config.yaml and
    `cube serve`. Checks the run, the settings and the extra answers' vectors (in the teacher's
    embedding store, where `cube serve --answers FILE` puts them) before any replica starts.

    Raises:
        ValueError: an unknown or missing argument, or bad settings (naming the key).
        RunError: run_dir is not a finished run.
        DataError: the answers file is unreadable or has no `answer` column.
        StoreError: an extra answer has no vector yet.
    """
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ValueError(f"unknown app argument(s) {unknown}; valid: {ARGS}")
    if not args.get("run_dir"):
        raise ValueError("pass run_dir=RUN_DIR (a folder written by `cube train`)")
    target = str(args["run_dir"]) if is_uri(args["run_dir"]) else str(Path(args["run_dir"]).expanduser().resolve())
    with Storage.of(target).reading() as path:
        run = RunDir(path)
        run.require("model", "bank.json", "teacher.json")
        teacher, dim = run.teacher()
    settings = args.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError(f"settings must be a mapping of sections, got {settings!r}")
    cfg = load_settings(args.get("config"), settings)
    answers = str(Path(args["answers"]).expanduser().resolve()) if args.get("answers") else None
    store_folder = None
    if answers:
        store_folder = str(store.default_store(teacher.identity()))
        store.vectors_for(Path(store_folder), read_answers(answers))  # fail here, not in every replica
    log.info("serving %s (teacher %s)%s", target, teacher.name, f" with extra answers {answers}" if answers else "")
    return compose(teacher, dim, target, cfg, answers, store_folder)
