"""The Ray Data embedding pipeline: Q&A text → teacher embeddings → a resumable Parquet store.

    read input ─▶ distinct texts ─▶ SkipDone ─▶ TeacherActor (actor pool, writes its own parts)

`cube embed` (jobs/embed.py) is its command line; `cube train` and `cube tune` call
`embed_source` before building a run's split (jobs/dataset.py). The input streams through; the
driver holds the store's keys (8 bytes a text) and a progress count. Everything a Ray worker
runs lives here, in an importable module: an entrypoint run as `__main__` would be pickled by value.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cube.config import from_dict, to_dict
from cube.data import store
from cube.data.qa import Source, text_hash
from cube.job_config import EmbedConfig, PipelineOptions
from cube.teachers import TeacherConfig, load_teacher
from cube.teachers.generate import AnswerWriter, GeneratorConfig
from jobs.common import configure_ray_data, ensure_ray
from jobs.stages import (
    IDLE_ACTOR,
    LIGHT,
    ROWS_PER_TASK,
    PartSink,
    SkipDone,
    generated_table,
    read_source,
    texts_of,
    with_question_keys,
    without_restarts,
)

log = logging.getLogger("cube.embed")
PROGRESS_EVERY_S = 10.0


# ---------------------------------------------------------------- Ray Data stages


class TeacherActor:
    """One teacher per actor, reused for every batch. With a `folder` it writes each batch's
    vectors as a part of the store itself and returns only a count."""

    def __init__(self, teacher: dict[str, Any], device: str, pipeline: dict[str, Any], folder: str | None) -> None:
        opts = from_dict(PipelineOptions, pipeline)
        torch.set_num_threads(opts.threads())  # on the actor's node
        self.cfg = from_dict(TeacherConfig, teacher)
        self.teacher = load_teacher(self.cfg, device)
        self.folder, self.dtype = folder, opts.store_dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        out = self.teacher.embed(texts)
        if self.folder is None:
            return {"text": batch["text"], "vector": out.vectors, "truncated": out.truncated}
        store.write_part(self.folder, store.to_table(texts, out.vectors, out.truncated, self.cfg.identity(),
                                                     self.dtype))
        return {"texts": np.array([len(texts)])}


class WriterActor:
    """One instruct model per actor; answers each question of the batch."""

    def __init__(self, generator: dict[str, Any], device: str, pipeline: dict[str, Any]) -> None:
        torch.set_num_threads(from_dict(PipelineOptions, pipeline).threads())
        self.cfg = from_dict(GeneratorConfig, generator)
        self.writer = AnswerWriter(self.cfg, device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(answer=self.writer.answer(batch["question"].tolist()), generator=self.cfg.name)


# ---------------------------------------------------------------- pipelines


def single_node() -> bool:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) == 1


def _embed_dataset(texts, teacher: TeacherConfig, opts: PipelineOptions, folder: Path, total: int | None) -> int:
    """Embed every text of the `texts` dataset that the store lacks; returns how many it embedded.

    On one node the teacher actors write their own parts; across nodes they hand the vectors to
    one writer on the driver's node, where the store folder is. Logs progress every
    PROGRESS_EVERY_S seconds (texts done, texts/s, time left)."""
    import ray.data

    configure_ray_data()
    device = "cuda" if opts.num_gpus > 0 else "cpu"
    actors_write = single_node()
    todo = without_restarts(texts.map_batches, SkipDone, fn_constructor_kwargs={"done": store.keys(folder)},
                            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), **IDLE_ACTOR)
    vectors = without_restarts(
        todo.map_batches, TeacherActor,
        fn_constructor_kwargs={"teacher": to_dict(teacher), "device": device, "pipeline": to_dict(opts),
                               "folder": str(folder) if actors_write else None},
        batch_size=opts.batch_size, compute=ray.data.ActorPoolStrategy(size=opts.concurrency),
        num_gpus=opts.num_gpus or None, num_cpus=opts.cpus_per_actor)
    progress = Progress("embedded", "texts", total)
    if actors_write:
        for batch in vectors.iter_batches(batch_size=None, batch_format="numpy"):
            progress.add(int(batch["texts"].sum()))
    else:
        identity = teacher.identity()
        for batch in vectors.iter_batches(batch_size=None, batch_format="numpy"):
            texts_done = [str(t) for t in batch["text"]]
            store.write_part(folder, store.to_table(texts_done, np.stack(batch["vector"]), batch["truncated"],
                                                    identity, opts.store_dtype))
            progress.add(len(texts_done))
    progress.close()
    return progress.done


class Progress:
    """A log line every PROGRESS_EVERY_S seconds: done, rate, time left. Meant for a log that is
    not a terminal (`ray job logs`), where a progress bar shows nothing until it ends."""

    def __init__(self, verb: str, unit: str, total: int | None) -> None:
        self.verb, self.unit, self.total = verb, unit, total
        self.done, self.start, self.last = 0, time.monotonic(), time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float, final: bool = False) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        text = f"{self.verb} {self.done:,}" + (f" / {self.total:,}" if self.total and not final else "")
        text += f" {self.unit}" + (f" in {now - self.start:.0f} s" if final else "") + f" ({rate:,.1f} {self.unit}/s"
        if self.total and rate > 0 and not final:
            left = max(self.total - self.done, 0) / rate
            text += f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"
        return text + ")"

    def close(self) -> None:
        if self.done:
            log.info(self.line(time.monotonic(), final=True))


def embed_texts(
    texts: Iterable[str], teacher: TeacherConfig, opts: PipelineOptions, folder: Path | None = None
) -> Path:
    """Make sure every text (a list in memory: extra answers, a test file) has a vector in the
    store; returns the store folder."""
    import ray.data

    identity = teacher.identity()
    folder = store.open_store(folder or store.default_store(identity, opts.store_dtype), identity, opts.store_dtype)
    unique = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    done = store.keys(folder)
    todo = [t for t, k in zip(unique, text_hash(unique)) if not _member(done, k)] if unique else []
    log.info("embedding store %s: %d texts wanted, %d already embedded, %d to embed",
             folder, len(unique), len(unique) - len(todo), len(todo))
    if todo:
        ensure_ray()
        blocks = max(1, math.ceil(len(todo) / (opts.batch_size * 4)))  # small blocks: a resume loses little
        items = ray.data.from_items([{"text": t} for t in todo], override_num_blocks=blocks)
        _embed_dataset(items, teacher, opts, folder, len(todo))
    return folder


def _member(sorted_keys: np.ndarray, key: np.uint64) -> bool:
    i = int(np.searchsorted(sorted_keys, key))
    return i < len(sorted_keys) and sorted_keys[i] == key


def embed_source(source: Source, columns: tuple[str, ...], teacher: TeacherConfig, opts: PipelineOptions,
                 folder: Path | None = None, total: int | None = None) -> Path:
    """Embed every text of `columns` of a (validated) input that the store lacks, streaming the
    input through Ray Data; returns the store folder. `total` (texts, if known) is for the
    progress lines."""
    identity = teacher.identity()
    folder = store.open_store(folder or store.default_store(identity, opts.store_dtype), identity, opts.store_dtype)
    ensure_ray()
    texts = read_source(source, list(columns), opts).map_batches(texts_of(columns), batch_format="pandas",
                                                                     batch_size=ROWS_PER_TASK, **LIGHT)
    log.info("embedding the texts of %s with %s into %s", source.spec, teacher.name, folder)
    _embed_dataset(texts, teacher, opts, folder, total)
    return folder


def embed_pairs(df: pd.DataFrame, teacher: TeacherConfig, opts: PipelineOptions,
                folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Question and answer vectors for every row of a small validated Q&A frame (a test file)."""
    questions, answers = df["question"].tolist(), df["answer"].tolist()
    folder = embed_texts(questions + answers, teacher, opts, folder)
    return store.vectors_for(folder, questions), store.vectors_for(folder, answers)


def generate_answers(source: Source, out: Path, cfg: EmbedConfig) -> Path:
    """Answer every question of the input with the generator; returns OUTPUT/qa.parquet."""
    import ray.data

    parts = out / "generated"
    parts.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cfg.pipeline.num_gpus > 0 else "cpu"
    done = store.keys(parts)
    questions = read_source(source, [cfg.data.question_col], cfg.pipeline).map_batches(
        with_question_keys(cfg.data.question_col), batch_format="pandas", batch_size=ROWS_PER_TASK, **LIGHT)
    todo = without_restarts(questions.map_batches, SkipDone, fn_constructor_kwargs={"done": done},
                            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), **IDLE_ACTOR)
    answered = without_restarts(
        todo.map_batches,
        WriterActor,
        fn_constructor_kwargs={
            "generator": to_dict(cfg.generator),
            "device": device,
            "pipeline": to_dict(cfg.pipeline),
        },
        batch_size=8,
        batch_format="pandas",
        num_gpus=cfg.pipeline.num_gpus or None,
        num_cpus=cfg.pipeline.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=cfg.pipeline.concurrency),
    )
    answered.write_datasink(PartSink(parts, generated_table), ray_remote_args=LIGHT)
    table = pa.concat_tables([pq.read_table(p) for p in store.parts(parts)])
    qa = table.drop_columns(["key"])
    target = out / "qa.parquet"
    tmp = out / f".qa.parquet.tmp{os.getpid()}"
    pq.write_table(qa, tmp)
    os.replace(tmp, target)
    log.info("%d teacher-written answers (generator %s) → %s", qa.num_rows, cfg.generator.name, target)
    return target


def embed_file(path: str | Path, out: Path, cfg: EmbedConfig) -> dict[str, Any]:
    """Validate, (generate answers,) embed; returns a summary. Nothing is written if validation fails."""
    from cube.data.qa import scan

    source = Source.of(path)
    rows = len(scan(source, cfg.data, require_answer=not cfg.generate_answers))
    identity = cfg.teacher.identity()
    store.open_store(out, identity, cfg.pipeline.store_dtype)
    ensure_ray()
    columns = (cfg.data.question_col, cfg.data.answer_col)
    if cfg.generate_answers:
        source, columns = Source.of(generate_answers(source, out, cfg)), ("question", "answer")
    before = len(store.keys(out))
    embed_source(source, columns, cfg.teacher, cfg.pipeline, out, total=None)
    table = store.read_all(out, columns=["key", "truncated"])
    return {"rows": rows, "texts_in_store": len(np.unique(table.column("key").to_numpy())),
            "embedded_now": len(store.keys(out)) - before,
            "truncated": int(sum(table.column("truncated").to_pylist())), "max_length": cfg.teacher.max_length,
            "store": str(out), "teacher": identity}
