"""Embed texts with a teacher through Ray Data, into a resumable Parquet embedding store.

    texts ─▶ skip ids already in the store ─▶ map_batches(TeacherActor, actor pool) ─▶ StoreSink

The teacher loads once per actor. The sink writes each block as its own Parquet part under a
temporary name and renames it into place, so an interrupted run keeps every finished block.

    python -m jobs.embed data/qa.jsonl --output embeddings/ --set teacher=smollm2
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from cube import store
from cube.config import from_dict, to_dict
from cube.data import DataConfig, load_qa, text_id
from cube.teacher import Teacher, TeacherConfig
from jobs.common import add_config_flags, config_from_args, ensure_ray, setup_logging

log = logging.getLogger("cube.embed")


@dataclass(frozen=True)
class PipelineOptions:
    """How the Ray Data embedding stage runs (not what it computes)."""

    concurrency: int = 1  # teacher actors in the pool
    batch_size: int = 64  # texts per teacher call
    num_gpus: float = 0.0  # per actor; > 0 runs the teacher on CUDA

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ValueError(f"concurrency and batch_size must be >= 1, got {self.concurrency}, {self.batch_size}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {self.num_gpus}")


@dataclass(frozen=True)
class EmbedConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)


class TeacherActor:
    """Ray Data callable class: one teacher per actor, reused for every batch."""

    def __init__(self, teacher: dict[str, Any], device: str) -> None:
        self.teacher = Teacher(from_dict(TeacherConfig, teacher), device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.teacher.embed([str(t) for t in batch["text"]])
        return {"id": batch["id"], "text": batch["text"], "vector": out.vectors, "truncated": out.truncated}


def _store_sink(folder: Path, identity: dict[str, Any]):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class StoreSink(Datasink):
        """Each write task adds complete parts to the store, atomically."""

        def write(self, blocks: Iterable, ctx) -> int:
            rows = 0
            for block in blocks:
                df = BlockAccessor.for_block(block).to_pandas()
                if len(df) == 0:
                    continue
                vectors = np.stack(df["vector"].to_numpy()).astype(np.float32)
                table = store.to_table(df["id"].tolist(), df["text"].tolist(), vectors,
                                       df["truncated"].to_numpy(bool), identity)
                store.write_part(folder, table)
                rows += len(df)
            return rows

        @property
        def supports_distributed_writes(self) -> bool:
            return False  # a local store folder lives on the driver's node

    return StoreSink()


def embed_texts(texts: Iterable[str], teacher: TeacherConfig, opts: PipelineOptions, folder: Path | None = None) -> Path:
    """Make sure every text has a vector in the store; returns the store folder."""
    import ray

    identity = teacher.identity()
    folder = store.open_store(folder or store.default_store(identity), identity)
    unique = {text_id(t): t for t in texts}
    done = store.existing_ids(folder)
    todo = [{"id": i, "text": t} for i, t in unique.items() if i not in done]
    log.info("embedding store %s: %d texts wanted, %d already embedded, %d to embed",
             folder, len(unique), len(unique) - len(todo), len(todo))
    if not todo:
        return folder
    ensure_ray()
    device = "cuda" if opts.num_gpus > 0 else "cpu"
    blocks = max(1, math.ceil(len(todo) / (opts.batch_size * 4)))  # small blocks: resume loses little
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    ds = ds.map_batches(TeacherActor, fn_constructor_kwargs={"teacher": to_dict(teacher), "device": device},
                        batch_size=opts.batch_size, compute=ray.data.ActorPoolStrategy(size=opts.concurrency),
                        num_gpus=opts.num_gpus or None)
    ds.write_datasink(_store_sink(folder, identity))
    return folder


def vectors_for(folder: Path, texts: list[str]) -> np.ndarray:
    """(len(texts), dim) vectors in the order of `texts`.

    Raises:
        store.StoreError: a text has no vector (the embedding step did not finish).
    """
    ids = [text_id(t) for t in texts]
    found = store.lookup(folder, ids)
    missing = [t for t, i in zip(texts, ids) if i not in found]
    if missing:
        raise store.StoreError(f"{len(missing)} texts have no vector in {folder} (first: {missing[0][:80]!r}); rerun to embed them")
    return np.stack([found[i] for i in ids]).astype(np.float32)


def embed_pairs(df: pd.DataFrame, teacher: TeacherConfig, opts: PipelineOptions, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Question and answer vectors for every row of a validated Q&A frame."""
    questions, answers = df["question"].tolist(), df["answer"].tolist()
    folder = embed_texts(questions + answers, teacher, opts, folder)
    return vectors_for(folder, questions), vectors_for(folder, answers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="Q&A file: JSONL, CSV or Parquet with question/answer columns")
    p.add_argument("--output", type=Path, required=True, help="embedding store folder (created; reruns add only new texts)")
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    cfg = config_from_args(EmbedConfig, args)
    df = load_qa(args.input, cfg.data)
    folder = embed_texts(df["question"].tolist() + df["answer"].tolist(), cfg.teacher, cfg.pipeline, args.output)
    table = store.read_all(folder, columns=["id", "truncated"])
    print(f"{folder}: {table.num_rows} embedded texts, {sum(table.column('truncated').to_pylist())} truncated "
          f"at teacher.max_length={cfg.teacher.max_length}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
