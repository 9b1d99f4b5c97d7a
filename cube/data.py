"""Question–answer files: strict reading, validation and deterministic splits.

Every problem is reported with the file, the row and what is wrong, before any work starts,
so a bad row never becomes a silently dropped (or silently trained-on) example.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

SPLITS = ("train", "val", "test")
SHIPPED_DATASET = Path(__file__).resolve().parent.parent / "data" / "qa.jsonl"


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
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must be in [0, 1) "
                "and leave a training split"
            )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from e


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for n, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n} must be a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    return [(reader.line_num, dict(row)) for row in reader]


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: cannot be read as Parquet ({e})") from e
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


READERS = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(row number, record) pairs from a JSONL, CSV or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported extension {path.suffix!r}; use one of {sorted(READERS)}")
    rows = reader(path)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows


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


def load_qa(path: str | Path, cfg: DataConfig = DataConfig(), require_answer: bool = True) -> pd.DataFrame:
    """Validated pairs as a DataFrame with columns question, answer, topic, row.

    Raises:
        DataError: missing column, empty or non-text value, non-UTF-8 bytes, duplicate pair.
    """
    path = Path(path)
    records = []
    seen: dict[tuple[str, str], int] = {}
    for row, rec in read_records(path):
        q = _text(path, row, rec, cfg.question_col)
        a = _text(path, row, rec, cfg.answer_col, required=require_answer)
        topic = _text(path, row, rec, cfg.topic_col, required=False)
        if (q, a) in seen:
            raise DataError(f"{path}: row {row} repeats the pair at row {seen[(q, a)]}; remove the duplicate")
        seen[(q, a)] = row
        records.append({"question": q, "answer": a, "topic": topic, "row": row})
    return pd.DataFrame.from_records(records)


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
