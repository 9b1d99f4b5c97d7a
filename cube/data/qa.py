"""Question–answer files: strict reading, validation and deterministic splits.

Every problem is reported with the file, the row and what is wrong, before any work starts,
so a bad row never becomes a silently dropped (or silently trained-on) example.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

SPLITS = ("train", "val", "test")
SHIPPED_DATASET = Path(__file__).resolve().parents[2] / "data" / "qa.jsonl"


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class DataConfig:
    question_col: str = "question"
    answer_col: str = "answer"
    topic_col: str = "topic"  # optional in the file
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (
            0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must be in [0, 1) "
                "and leave a training split"
            )


def _lines(path: Path):
    """(line number, decoded line) without reading the whole file."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid UTF-8 (byte {e.start} of the line); "
                                "re-save the file as UTF-8") from e


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n} must be a JSON object, got {type(obj).__name__}")
        yield n, obj


def _iter_csv(path: Path) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(line for _, line in _lines(path))
    for row in reader:
        yield reader.line_num, dict(row)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        offset = 0
        for batch in batches:
            for i, row in enumerate(batch.to_pylist()):
                yield offset + i + 1, row
            offset += batch.num_rows
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot be read as Parquet ({e})") from e


READERS = {".jsonl": _iter_jsonl, ".json": _iter_jsonl, ".csv": _iter_csv, ".parquet": _iter_parquet}


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(row number, record) pairs streamed from a JSONL, CSV or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; use one of {sorted(READERS)}")
    empty = True
    for item in reader(path):
        empty = False
        yield item
    if empty:
        raise DataError(f"{path}: the file holds no rows")


def _text(path: Path, row: int, record: dict, col: str, required: bool = True) -> str:
    if col not in record:
        if not required:
            return ""
        raise DataError(f"{path}: row {row} has no {col!r} column (columns: {sorted(record)}); "
                        f"rename it or pass the column name in the data config")
    value = record[col]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: row {row} column {col!r} must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise DataError(f"{path}: row {row} column {col!r} is empty")
    return value


def iter_pairs(path: str | Path, cfg: DataConfig = DataConfig(), require_answer: bool = True) -> Iterator[dict]:
    """Validated rows {question, answer, topic, row}, streamed; memory grows only with a
    16-byte digest per row (for the duplicate check).

    Raises:
        DataError: missing column, empty or non-text value, non-UTF-8 bytes, duplicate pair.
    """
    path = Path(path)
    seen: dict[bytes, int] = {}
    for row, rec in iter_records(path):
        q = _text(path, row, rec, cfg.question_col)
        a = _text(path, row, rec, cfg.answer_col, required=require_answer)
        topic = _text(path, row, rec, cfg.topic_col, required=False)
        digest = hashlib.blake2b(f"{q}\x00{a}".encode(), digest_size=16).digest()
        if digest in seen:
            what = "pair" if require_answer else "question"
            raise DataError(f"{path}: row {row} repeats the {what} at row {seen[digest]}; remove the duplicate")
        seen[digest] = row
        yield {"question": q, "answer": a, "topic": topic, "row": row}


def load_qa(path: str | Path, cfg: DataConfig = DataConfig(), require_answer: bool = True) -> pd.DataFrame:
    """Validated pairs as a DataFrame with columns question, answer, topic, row (see iter_pairs)."""
    return pd.DataFrame.from_records(list(iter_pairs(path, cfg, require_answer)),
                                     columns=["question", "answer", "topic", "row"])


def _rank_key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def split_pairs(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Add a `split` column. Splits are cut over distinct questions ordered by a seeded hash,
    so the same question never lands in two splits and the result is stable across machines."""
    questions = sorted(df["question"].unique(), key=lambda q: _rank_key(q, cfg.seed))
    n = len(questions)
    n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.val_fraction)
    if n - n_test - n_val < 2:
        raise DataError(f"only {n} distinct questions: too few to leave a training split")
    which = {q: "test" for q in questions[:n_test]}
    which.update({q: "val" for q in questions[n_test : n_test + n_val]})
    which.update({q: "train" for q in questions[n_test + n_val :]})
    return df.assign(split=df["question"].map(which))


def text_id(text: str) -> str:
    """Stable id of a text: the embedding store's key."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
