"""A run folder: everything `cube eval` and `cube serve` need, with no Ray and no re-embedding.

    config.yaml      the resolved training config
    teacher.json     the teacher config (+ dim) that embedded the pairs
    split.parquet    every pair: text, topic, split, question and answer vectors
    model/           best checkpoint by validation MRR (safetensors + config.json)
    last/            last checkpoint
    metrics.csv      one row per epoch
    eval.json        the held-out comparison written at the end of training
    ray/             Ray Train's own storage (per-epoch checkpoints, used for resume)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cube.config import from_dict
from cube.eval.metrics import HeldOut, Split
from cube.teachers.base import TeacherConfig


class RunError(RuntimeError):
    """A run folder that is missing pieces; the message says which and how to make them."""


def vectors_to_arrow(v: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(v, np.float32).reshape(-1)), v.shape[1])


def arrow_to_vectors(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


def write_split(path: Path, df: pd.DataFrame, q: np.ndarray, a: np.ndarray) -> None:
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    table = table.append_column("q_vec", vectors_to_arrow(q)).append_column("a_vec", vectors_to_arrow(a))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_split(path: Path) -> RunData:
    """A run's split.parquet (every pair with its split and vectors)."""
    table = pq.read_table(path)
    frame = table.drop_columns(["q_vec", "a_vec"]).to_pandas()
    return RunData(frame, arrow_to_vectors(table.column("q_vec")), arrow_to_vectors(table.column("a_vec")))


@dataclass
class RunData:
    """The pairs of a run with their vectors, split by split."""

    frame: pd.DataFrame  # question, answer, topic, row, split
    q: np.ndarray
    a: np.ndarray

    def part(self, name: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        mask = (self.frame["split"] == name).to_numpy()
        return self.frame[mask].reset_index(drop=True), self.q[mask], self.a[mask]

    def split(self, name: str) -> Split:
        _, q, a = self.part(name)
        return Split(torch.as_tensor(q), torch.as_tensor(a))

    def held_out(self, name: str) -> HeldOut:
        """The split's questions ranked against its distinct answers (the evaluation pool)."""
        return HeldOut.from_frame(*self.part(name))

    def probe(self) -> HeldOut:
        """A fixed slice of training pairs the size of the val split, scored like val."""
        return self.held_out("train").head(len(self.held_out("val")))


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def require(self, *names: str) -> None:
        missing = [n for n in names if not (self.path / n).exists()]
        if missing:
            raise RunError(f"{self.path} is not a finished cube run (missing {missing}); "
                           f"train one with `cube train --data FILE --output {self.path}`")

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def teacher(self) -> tuple[TeacherConfig, int]:
        self.require("teacher.json")
        meta = json.loads((self.path / "teacher.json").read_text())
        dim = meta.pop("dim")
        return from_dict(TeacherConfig, meta), dim

    def data(self) -> RunData:
        self.require("split.parquet")
        return read_split(self.path / "split.parquet")
