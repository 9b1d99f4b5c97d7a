"""A run folder: everything `cube eval` and `cube serve` need, with no Ray and no re-embedding.

    config.yaml      the resolved training config
    teacher.json     the teacher config (+ dim) whose space the vectors are in
    split.json       where the split dataset is (split/ here, or a URI), its row counts and the
                     training split's means (cube/data/split.py)
    split/           every pair with its vectors, by split (a Parquet dataset)
    bank.json        where the answer bank is (bank/ here, or a URI) and its size
    bank/            the answers a served run searches: every distinct answer with its vector
    model/           best checkpoint by validation MRR (safetensors + config.json)
    last/            last checkpoint
    metrics.csv      one row per epoch
    eval.json        the held-out comparison written at the end of training
    ray/             Ray Train's own storage (per-epoch checkpoints, used for resume)
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from cube.config import from_dict, load_config
from cube.data.split import Moments, SplitData
from cube.teachers.base import TeacherConfig


class RunError(RuntimeError):
    """A run folder that is missing pieces; the message says which and how to make them."""


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


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

    def config(self, cls: type) -> Any:
        """The run's resolved config (config.yaml) as `cls`: the one way a run's config is read."""
        self.require("config.yaml")
        return load_config(cls, self.path / "config.yaml")

    def teacher(self) -> tuple[TeacherConfig, int]:
        self.require("teacher.json")
        meta = json.loads((self.path / "teacher.json").read_text())
        dim = meta.pop("dim")
        return from_dict(TeacherConfig, meta), dim

    def split_info(self) -> dict[str, Any]:
        self.require("split.json")
        return json.loads((self.path / "split.json").read_text())

    def split(self) -> SplitData:
        """The run's split dataset, wherever split.json says it is (a folder here or a URI)."""
        root = self.split_info()["root"]
        return SplitData(root if "://" in root else str(self.path / root))

    def moments(self) -> Moments:
        info = self.split_info()
        return Moments(info["rows"]["train"], np.asarray(info["q_mean"]), np.asarray(info["a_mean"]))

    def write_split_info(self, root: str, rows: dict[str, int], moments: Moments) -> None:
        """Record where the split is (relative when it is the run's own split/), its size and means."""
        local = "://" not in root and Path(root).resolve() == (self.path / "split").resolve()
        write_json(self.path / "split.json", {"root": "split" if local else root, "rows": rows,
                                              "q_mean": moments.q_mean.tolist(), "a_mean": moments.a_mean.tolist()})

    def write_bank_info(self, root: str, rows: int, dtype: str) -> None:
        local = "://" not in root and Path(root).resolve() == (self.path / "bank").resolve()
        write_json(self.path / "bank.json", {"root": "bank" if local else root, "rows": rows, "dtype": dtype})

    def bank_root(self) -> str:
        """Where the run's answer bank is (a folder here, or a URI): what replicas read."""
        self.require("bank.json")
        root = json.loads((self.path / "bank.json").read_text())["root"]
        return root if "://" in root else str(self.path / root)
