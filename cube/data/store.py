"""The embedding store: a folder of Parquet parts of text vectors, keyed by a 64-bit text hash.

Layout of a store folder (one teacher configuration per folder):

    teacher.json          the teacher identity the vectors were made with (and the store's dtype)
    part-<uuid>.parquet   columns key (uint64, cube.data.qa.text_hash), text,
                          vector (fixed-size list of float32, or float16), truncated

Each part is written under a temporary name unique to its writer and renamed into place, so a
killed run leaves only complete parts, and jobs embedding into one store at once never touch
each other's files; rerunning embeds just the texts no part holds yet. The store is read with
pyarrow.dataset (column projection and filters), so a lookup holds only what it found. Two
writers may both embed a text; readers take its first vector.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cube.data.cache import cache_dir
from cube.data.qa import text_hash

TEACHER_KEY = b"cube.teacher"
STALE_S = 3600.0  # a temporary part older than this, of no live writer, is a leftover of a killed run
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


class StoreError(RuntimeError):
    """A store that does not match what was asked of it."""


def fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def default_store(identity: dict[str, Any], dtype: str = "float32") -> Path:
    """The cache folder that `cube train` uses for a teacher identity (and store precision)."""
    meta = {**identity, "store_dtype": dtype}
    return cache_dir("embeddings") / f"{identity['name'].replace('/', '_')}-{fingerprint(meta)}"


def _stale(tmp: Path) -> bool:
    """A temporary part from a writer that is gone: its process on this host is dead, or it is
    older than STALE_S (a writer on another host sharing this folder)."""
    try:
        _, host, pid, _ = tmp.name.rsplit(".", 3)
        if host == socket.gethostname():
            import psutil

            return not psutil.pid_exists(int(pid))
    except ValueError:
        pass  # not our naming: judge by age
    try:
        return time.time() - tmp.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return False  # its writer just renamed it into place


def open_store(folder: str | Path, identity: dict[str, Any], dtype: str = "float32") -> Path:
    """Create `folder` for `identity`, or check that it already holds that teacher's vectors.

    Raises:
        StoreError: the folder holds embeddings of another teacher configuration or precision.
    """
    if dtype not in DTYPES:
        raise StoreError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    folder = Path(folder)
    meta = folder / "teacher.json"
    wanted = {**identity, "store_dtype": dtype}
    for tmp in folder.glob(".part-*.tmp"):
        if _stale(tmp):
            tmp.unlink(missing_ok=True)
    if meta.is_file():
        stored = json.loads(meta.read_text())
        stored.setdefault("store_dtype", "float32")
        if stored != wanted:
            raise StoreError(
                f"{folder} holds embeddings made with teacher {stored}, not {wanted}; "
                "write to another --output folder (stores never mix teachers)"
            )
        return folder
    if folder.exists() and any(folder.glob("part-*.parquet")):
        raise StoreError(f"{folder} has Parquet parts but no teacher.json; it is not a cube embedding store")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name(f".teacher.json.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True))
    os.replace(tmp, meta)
    return folder


def store_dtype(folder: str | Path) -> str:
    return json.loads((Path(folder) / "teacher.json").read_text()).get("store_dtype", "float32")


def parts(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("part-*.parquet"))


def schema(dim: int, identity: dict[str, Any], dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [("key", pa.uint64()), ("text", pa.string()), ("vector", pa.list_(DTYPES[dtype], dim)),
         ("truncated", pa.bool_())],
        metadata={TEACHER_KEY: json.dumps(identity, sort_keys=True).encode()},
    )


def to_table(texts: list[str], vectors: np.ndarray, truncated: np.ndarray, identity: dict[str, Any],
             dtype: str = "float32") -> pa.Table:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.dtype(dtype)).reshape(-1))
    columns = [pa.array(text_hash(texts), pa.uint64()), pa.array(texts, pa.string()),
               pa.FixedSizeListArray.from_arrays(flat, dim), pa.array(truncated, pa.bool_())]
    return pa.Table.from_arrays(columns, schema=schema(dim, identity, dtype))


def write_part(folder: str | Path, table: pa.Table) -> Path:
    """Atomically add one part to the store (a temporary name of this writer's own, then a rename)."""
    part = uuid.uuid4().hex
    tmp = Path(folder) / f".part-{part}.{socket.gethostname()}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    final = Path(folder) / f"part-{part}.parquet"
    os.replace(tmp, final)
    return final


def dataset(folder: str | Path) -> pads.Dataset:
    return pads.dataset([str(p) for p in parts(folder)], format="parquet")


def keys(folder: str | Path) -> np.ndarray:
    """The sorted distinct keys the store holds (8 bytes each: what a skip list needs)."""
    if not parts(folder):
        return np.zeros(0, np.uint64)
    column = dataset(folder).to_table(columns=["key"]).column("key")
    return np.unique(column.to_numpy())


def lookup(folder: str | Path, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, vectors as float32) of the wanted keys the store holds, one row per key, in no
    particular order: one filtered scan, whose memory is what it finds."""
    wanted = np.unique(np.asarray(wanted, dtype=np.uint64))
    if not parts(folder) or not len(wanted):
        return np.zeros(0, np.uint64), np.zeros((0, 0), np.float32)
    table = dataset(folder).to_table(columns=["key", "vector"], filter=pc.field("key").isin(pa.array(wanted)))
    found = table.column("key").to_numpy()
    found, first = np.unique(found, return_index=True)  # two writers may both have embedded a text
    vectors = table.column("vector").combine_chunks()
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1)  # slice-aware
    return found, matrix[first].astype(np.float32)


def vectors_for(folder: str | Path, texts: list[str]) -> np.ndarray:
    """(len(texts), dim) float32 vectors in the order of `texts`.

    Raises:
        StoreError: a text has no vector (the embedding step did not finish).
    """
    wanted = text_hash(texts)
    found, vectors = lookup(folder, wanted)
    idx = np.searchsorted(found, wanted)
    ok = idx < len(found)
    ok[ok] = found[idx[ok]] == wanted[ok]
    if not ok.all():
        missing = [t for t, hit in zip(texts, ok) if not hit]
        raise StoreError(f"{len(missing)} texts have no vector in {folder} (first: {missing[0][:80]!r}); "
                         "rerun to embed them")
    return vectors[idx]


def read_all(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    if not parts(folder):
        raise StoreError(f"{folder} holds no embeddings yet")
    return dataset(folder).to_table(columns=columns)
