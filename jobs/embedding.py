"""The Ray Data embedding pipeline: Q&A text → teacher embeddings → a resumable Parquet store.

    read file ─▶ texts + ids ─▶ SkipDone ─▶ TeacherActor (actor pool) ─▶ PartSink (atomic parts)

`cube embed` (jobs/embed.py, whose --help tells the user what it does) is its command line;
`cube train` and `cube tune` call `embed_pairs`. Everything a Ray worker runs lives here, in an
importable module: an entrypoint run as `__main__` would be pickled by value.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cube.config import from_dict, to_dict
from cube.data import store
from cube.data.qa import iter_pairs, text_id
from cube.job_config import EmbedConfig, PipelineOptions
from cube.teachers import TeacherConfig, load_teacher
from cube.teachers.generate import AnswerWriter, GeneratorConfig
from jobs.common import describe_nodes, ensure_ray, fits, node_resources, quiet_ray_data

log = logging.getLogger("cube.embed")
# The light stages (read, id, skip, write) take a sliver of a CPU each: with Ray's default of one
# CPU per task they would wait forever behind a teacher actor on a 2-core machine. The id filter
# is an actor that idles between batches, so it reserves none. Ray Data's Parquet file listing
# still asks for a whole CPU and takes no options: see check_room_for_listing.
LIGHT = {"num_cpus": 0.1}
# max_restarts=0 on our actors: with restarts on, Ray's core worker prints an error line about
# constructor arguments in the object store on every run. Nothing is lost without them: a dead
# actor fails the job loudly, and the rerun embeds only what no finished part holds.
NO_RESTART = {"max_restarts": 0}


def without_restarts(map_batches: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`map_batches(..., max_restarts=0)`. Ray 2.60 has no named parameter for it and warns that
    the catch-all kwargs it goes through are deprecated, though its own actor pool reads it from
    there (actor_pool_map_operator.py): that one warning is silenced, by its exact message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return map_batches(*args, **kwargs, **NO_RESTART)


IDLE_ACTOR = {"num_cpus": 0}


# ---------------------------------------------------------------- Ray Data stages


class TeacherActor:
    """One teacher per actor, reused for every batch."""

    def __init__(self, teacher: dict[str, Any], device: str, pipeline: dict[str, Any]) -> None:
        torch.set_num_threads(from_dict(PipelineOptions, pipeline).threads())  # on the actor's node
        self.teacher = load_teacher(from_dict(TeacherConfig, teacher), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.teacher.embed([str(t) for t in batch["text"]])
        return {"id": batch["id"], "text": batch["text"], "vector": out.vectors, "truncated": out.truncated}


class WriterActor:
    """One instruct model per actor; answers each question of the batch."""

    def __init__(self, generator: dict[str, Any], device: str, pipeline: dict[str, Any]) -> None:
        torch.set_num_threads(from_dict(PipelineOptions, pipeline).threads())
        self.cfg = from_dict(GeneratorConfig, generator)
        self.writer = AnswerWriter(self.cfg, device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(answer=self.writer.answer(batch["question"].tolist()), generator=self.cfg.name)


class SkipDone:
    """Drops rows whose id is in `done`: the ids that the store already held when the driver
    looked (the driver reads the store, since this actor may run on a node without it)."""

    def __init__(self, done: set[str]) -> None:
        self.done = done

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch[~batch["id"].isin(self.done)]


def texts_of(columns: tuple[str, ...]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def explode(batch: pd.DataFrame) -> pd.DataFrame:
        texts = pd.unique(pd.concat([batch[c].astype(str).str.strip() for c in columns]))
        return pd.DataFrame({"id": [text_id(t) for t in texts], "text": texts})

    return explode


def with_question_ids(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def add(batch: pd.DataFrame) -> pd.DataFrame:
        q = batch[column].astype(str).str.strip()
        return pd.DataFrame({"id": [text_id(t) for t in q], "question": q})

    return add


class PartSink:
    """A Datasink that turns each block into one complete Parquet part in `folder`."""

    def __new__(cls, folder: Path, make_table: Callable[[pd.DataFrame], pa.Table]):
        from ray.data import Datasink
        from ray.data.block import BlockAccessor

        class _PartSink(Datasink):
            def write(self, blocks: Iterable, ctx) -> int:
                rows = 0
                for block in blocks:
                    df = BlockAccessor.for_block(block).to_pandas()
                    if len(df):
                        store.write_part(folder, make_table(df))
                        rows += len(df)
                return rows

            @property
            def supports_distributed_writes(self) -> bool:
                return False  # Ray Data then writes on the driver's node, where `folder` is

        return _PartSink()


def store_table(identity: dict[str, Any]) -> Callable[[pd.DataFrame], pa.Table]:
    def make(df: pd.DataFrame) -> pa.Table:
        vectors = np.stack(df["vector"].to_numpy()).astype(np.float32)
        return store.to_table(df["id"].tolist(), df["text"].tolist(), vectors, df["truncated"].to_numpy(bool), identity)

    return make


def generated_table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df[["id", "question", "answer", "generator"]], preserve_index=False)


def check_room_for_listing(opts: PipelineOptions) -> None:
    """Ray Data lists Parquet files in a task that needs one whole free CPU on one node (and
    takes no options); if the teacher actors hold the rest, the read waits forever. Refuse up
    front, placing the actors and the listing task node by node as Ray would have to.

    Raises:
        ValueError: naming the settings to change.
    """
    actor, nodes = {"CPU": opts.cpus_per_actor, "GPU": opts.num_gpus}, node_resources()
    if not fits([actor] * opts.concurrency + [{"CPU": 1.0}], nodes):
        raise ValueError(f"{opts.concurrency} teacher actors x {opts.cpus_per_actor:g} CPU leave no node with the one "
                         f"free CPU that Ray Data needs to list a Parquet file ({describe_nodes(nodes)}); "
                         "lower pipeline.concurrency or pipeline.cpus_per_actor")


def read_file(path: Path, columns: list[str], opts: PipelineOptions):
    """A streaming Ray dataset of `columns` (all read as text) from JSONL, CSV or Parquet."""
    import pyarrow.csv as pcsv
    import ray.data

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        ds = ray.data.read_json(str(path), lines=True, ray_remote_args=LIGHT)
    elif suffix == ".csv":
        types = {c: pa.string() for c in columns}
        ds = ray.data.read_csv(
            str(path), convert_options=pcsv.ConvertOptions(column_types=types), ray_remote_args=LIGHT
        )
    else:
        check_room_for_listing(opts)
        ds = ray.data.read_parquet(str(path), columns=columns, ray_remote_args=LIGHT)
    return ds.select_columns(columns, **LIGHT)


# ---------------------------------------------------------------- pipelines


def _embed_dataset(texts, teacher: TeacherConfig, opts: PipelineOptions, folder: Path) -> None:
    import ray.data

    quiet_ray_data()

    device = "cuda" if opts.num_gpus > 0 else "cpu"
    texts = without_restarts(texts.map_batches, SkipDone, fn_constructor_kwargs={"done": store.existing_ids(folder)},
                             batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1), **IDLE_ACTOR)
    vectors = without_restarts(
        texts.map_batches, TeacherActor,
        fn_constructor_kwargs={"teacher": to_dict(teacher), "device": device, "pipeline": to_dict(opts)},
        batch_size=opts.batch_size, compute=ray.data.ActorPoolStrategy(size=opts.concurrency),
        num_gpus=opts.num_gpus or None, num_cpus=opts.cpus_per_actor)
    vectors.write_datasink(PartSink(folder, store_table(teacher.identity())), ray_remote_args=LIGHT)


def embed_texts(
    texts: Iterable[str], teacher: TeacherConfig, opts: PipelineOptions, folder: Path | None = None
) -> Path:
    """Make sure every text (held in memory) has a vector in the store; returns the store folder."""
    import ray.data

    identity = teacher.identity()
    folder = store.open_store(folder or store.default_store(identity), identity)
    unique = {text_id(t): t for t in texts}
    done = store.existing_ids(folder)
    todo = [{"id": i, "text": t} for i, t in unique.items() if i not in done]
    log.info("embedding store %s: %d texts wanted, %d already embedded, %d to embed",
             folder, len(unique), len(unique) - len(todo), len(todo))
    if todo:
        ensure_ray()
        blocks = max(1, math.ceil(len(todo) / (opts.batch_size * 4)))  # small blocks: a resume loses little
        _embed_dataset(ray.data.from_items(todo, override_num_blocks=blocks), teacher, opts, folder)
    return folder


def embed_pairs(
    df: pd.DataFrame, teacher: TeacherConfig, opts: PipelineOptions, folder: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Question and answer vectors for every row of a validated Q&A frame."""
    questions, answers = df["question"].tolist(), df["answer"].tolist()
    folder = embed_texts(questions + answers, teacher, opts, folder)
    return store.vectors_for(folder, questions), store.vectors_for(folder, answers)


def generate_answers(path: Path, out: Path, cfg: EmbedConfig) -> Path:
    """Answer every question of `path` with the generator; returns OUTPUT/qa.parquet."""
    import ray.data

    parts = out / "generated"
    parts.mkdir(parents=True, exist_ok=True)
    device = "cuda" if cfg.pipeline.num_gpus > 0 else "cpu"
    questions = read_file(path, [cfg.data.question_col], cfg.pipeline).map_batches(
        with_question_ids(cfg.data.question_col), batch_format="pandas", **LIGHT)
    todo = without_restarts(questions.map_batches, SkipDone, fn_constructor_kwargs={"done": store.existing_ids(parts)},
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
    qa = table.drop_columns(["id"])
    target = out / "qa.parquet"
    tmp = out / f".qa.parquet.tmp{os.getpid()}"
    pq.write_table(qa, tmp)
    os.replace(tmp, target)
    log.info("%d teacher-written answers (generator %s) → %s", qa.num_rows, cfg.generator.name, target)
    return target


def embed_file(path: Path, out: Path, cfg: EmbedConfig) -> dict[str, Any]:
    """Validate, (generate answers,) embed; returns a summary. Nothing is written if validation fails."""
    rows = sum(1 for _ in iter_pairs(path, cfg.data, require_answer=not cfg.generate_answers))
    identity = cfg.teacher.identity()
    store.open_store(out, identity)
    ensure_ray()
    columns = [cfg.data.question_col, cfg.data.answer_col]
    if cfg.generate_answers:
        path, columns = generate_answers(path, out, cfg), ["question", "answer"]
    before = len(store.existing_ids(out))
    texts = read_file(path, columns, cfg.pipeline).map_batches(texts_of(tuple(columns)), batch_format="pandas", **LIGHT)
    _embed_dataset(texts, cfg.teacher, cfg.pipeline, out)
    table = store.read_all(out, columns=["id", "truncated"])
    return {"rows": rows, "texts_in_store": table.num_rows, "embedded_now": table.num_rows - before,
            "truncated": int(sum(table.column("truncated").to_pylist())), "max_length": cfg.teacher.max_length,
            "store": str(out), "teacher": identity}
