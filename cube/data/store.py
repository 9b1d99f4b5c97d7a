"""The embedding store: a folder of Parquet parts keyed by a stable text id.

Layout of a store folder (one teacher configuration per folder):

    teacher.json          the teacher identity the vectors were made with
    part-<uuid>.parquet   columns id, text, vector (fixed-size list<float32>), truncated

Each part is written to a temporary name and renamed into place, so a killed run leaves only
complete parts; rerunning embeds just the ids that no part holds yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cube.data.cache import cache_dir
from cube.data.qa import text_id

TEACHER_KEY = b"cube.teacher"


class StoreError(RuntimeError):
    """A store that does not match what was asked of it."""


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def default_store(identity: dict[str, Any]) -> Path:
    """The cache folder that `cube train` uses for a teacher identity."""
    return cache_dir("embeddings") / f"{identity['name'].replace('/', '_')}-{fingerprint(identity)}"


def open_store(folder: str | Path, identity: dict[str, Any]) -> Path:
    """Create `folder` for `identity`, or check that it already holds that teacher's vectors.

    Raises:
        StoreError: the folder holds embeddings of another teacher configuration.
    """
    folder = Path(folder)
    meta = folder / "teacher.json"
    for stale in folder.glob(".part-*.tmp"):  # from a run killed mid-write; never counted as a part
        stale.unlink()
    if meta.is_file():
        stored = json.loads(meta.read_text())
        if stored != identity:
            raise StoreError(
                f"{folder} holds embeddings made with teacher {stored}, not {identity}; "
                "write to another --output folder (stores never mix teachers)"
            )
        return folder
    if folder.exists() and any(folder.glob("part-*.parquet")):
        raise StoreError(f"{folder} has Parquet parts but no teacher.json; it is not a cube embedding store")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
    os.replace(tmp, meta)
    return folder


def parts(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.parquet"))


def schema(dim: int, identity: dict[str, Any]) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            ("vector", pa.list_(pa.float32(), dim)),
            ("truncated", pa.bool_()),
        ],
        metadata={TEACHER_KEY: json.dumps(identity, sort_keys=True).encode()},
    )


def to_table(
    ids: list[str], texts: list[str], vectors: np.ndarray, truncated: np.ndarray, identity: dict[str, Any]
) -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    columns = [pa.array(ids, pa.string()), pa.array(texts, pa.string()),
               pa.FixedSizeListArray.from_arrays(flat, dim), pa.array(truncated, pa.bool_())]
    return pa.Table.from_arrays(columns, schema=schema(dim, identity))


def write_part(folder: Path, table: pa.Table) -> Path:
    """Atomically add one part to the store."""
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = Path(folder) / f".{name}.tmp"  # matches the stale-file sweep in open_store
    pq.write_table(table, tmp)
    os.replace(tmp, Path(folder) / name)
    return Path(folder) / name


def existing_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for part in parts(folder):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def lookup(folder: Path, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """id → vector for every wanted id that the store holds."""
    wanted = pa.array(sorted(set(wanted)), pa.string())
    found: dict[str, np.ndarray] = {}
    for part in parts(folder):
        table = pq.read_table(part, columns=["id", "vector"])
        table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
        if table.num_rows == 0:
            continue
        vectors = table.column("vector").combine_chunks()
        matrix = vectors.values.to_numpy().reshape(len(vectors), -1)
        found.update(zip(table.column("id").to_pylist(), matrix))
    return found


def read_all(folder: Path, columns: list[str] | None = None) -> pa.Table:
    tables = [pq.read_table(p, columns=columns) for p in parts(folder)]
    if not tables:
        raise StoreError(f"{folder} holds no embeddings yet")
    return pa.concat_tables(tables)


def vectors_for(folder: Path, texts: list[str]) -> np.ndarray:
    """(len(texts), dim) vectors in the order of `texts`.

    Raises:
        StoreError: a text has no vector (the embedding step did not finish).
    """
    ids = [text_id(t) for t in texts]
    found = lookup(folder, ids)
    missing = [t for t, i in zip(texts, ids) if i not in found]
    if missing:
        raise StoreError(
            f"{len(missing)} texts have no vector in {folder} (first: {missing[0][:80]!r}); rerun to embed them"
        )
    return np.stack([found[i] for i in ids]).astype(np.float32)
