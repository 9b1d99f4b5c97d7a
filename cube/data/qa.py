"""Question–answer input: where it is, strict validation, and leak-free deterministic splits.

Input is a JSONL, CSV or Parquet file, a folder of Parquet files, or a URI that pyarrow's
filesystems open (s3://, gs://, file://). `scan` streams it once and keeps 30 bytes a row
(hashes, file and row numbers), so a corpus of millions of pairs is validated in flat memory;
every problem is reported with the file, the row and what is wrong, before any work starts.

Splits are cut over *groups* of pairs that share a question or an answer (connected
components), so that no question and no answer text of val or test appears in train.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

SPLITS = ("train", "val", "test")
SHIPPED_DATASET = Path(__file__).resolve().parents[2] / "data" / "qa.jsonl"
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
CHUNK = 65_536  # rows per validated chunk


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the problem."""


@dataclass(frozen=True)
class DataConfig:
    question_col: str = "question"
    answer_col: str = "answer"
    topic_col: str = "topic"  # optional in the file
    # Bring your own embeddings: a Parquet input with these two columns (fixed-size float lists)
    # skips the teacher; `teacher` then names the model whose space the vectors are in.
    question_embedding_col: str = "question_embedding"
    answer_embedding_col: str = "answer_embedding"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ValueError(
                f"val_fraction={self.val_fraction} and test_fraction={self.test_fraction} must be in [0, 1) "
                "and leave a training split"
            )


# ---------------------------------------------------------------- where the input is


@dataclass(frozen=True)
class Source:
    """A `--data` argument resolved: its filesystem, its files in read order and their format."""

    spec: str  # what the user gave
    fs: pafs.FileSystem
    files: tuple[str, ...]  # paths on `fs`
    format: str  # jsonl | csv | parquet

    @classmethod
    def of(cls, spec: str | Path | Source) -> Source:
        """Raises DataError: nothing there, an unsupported extension, a folder with no Parquet files."""
        if isinstance(spec, Source):
            return spec
        spec = str(spec)
        try:
            fs, root = pafs.FileSystem.from_uri(spec) if "://" in spec else (pafs.LocalFileSystem(), str(Path(spec)))
        except Exception as e:  # pyarrow raises several types for a URI it cannot open
            raise DataError(f"{spec}: cannot open ({e}); give a path or a file://, s3:// or gs:// URI") from None
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{spec}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                           if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                           and not Path(i.path).name.startswith((".", "_")))
            if not found:
                raise DataError(f"{spec}: the folder holds no .parquet files (a folder input is a Parquet dataset)")
            return cls(spec, fs, tuple(found), "parquet")
        fmt = FORMATS.get(Path(root).suffix.lower())
        if fmt is None:
            raise DataError(f"{spec}: unsupported extension {Path(root).suffix!r}; use one of {sorted(FORMATS)}, "
                            "or a folder of .parquet files")
        return cls(spec, fs, (root,), fmt)

    def name(self, file: str) -> str:
        """How messages name one of the files: as the user would find it."""
        return self.spec if len(self.files) == 1 else file

    def columns(self) -> list[str] | None:
        """The Parquet schema's column names (None for JSONL and CSV, whose columns are per row)."""
        if self.format != "parquet":
            return None
        return pq.read_schema(self.files[0], filesystem=self.fs).names

    def embedding_dim(self, cfg: DataConfig) -> int | None:
        """The dimension of a bring-your-own-embeddings Parquet input, None if it carries none.

        Raises:
            DataError: only one of the two columns, or columns that are not float lists."""
        names = self.columns() or []
        has = [c in names for c in (cfg.question_embedding_col, cfg.answer_embedding_col)]
        if not any(has):
            return None
        if not all(has):
            raise DataError(f"{self.spec}: has only one of {cfg.question_embedding_col!r} and "
                            f"{cfg.answer_embedding_col!r}; bring both embeddings, or neither")
        schema = pq.read_schema(self.files[0], filesystem=self.fs)
        dims = set()
        for col in (cfg.question_embedding_col, cfg.answer_embedding_col):
            t = schema.field(col).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
                    pa.types.is_floating(t.value_type)):
                raise DataError(f"{self.spec}: column {col!r} must be a list of floats, got {t}")
            dims.add(t.list_size if pa.types.is_fixed_size_list(t) else None)
        if None in dims:  # variable-length lists: the first row says, every row is checked where read
            first = pq.ParquetFile(self.files[0], filesystem=self.fs).read_row_group(
                0, columns=[cfg.question_embedding_col, cfg.answer_embedding_col])
            dims = {len(first.column(c)[0]) for c in first.column_names}
        if len(dims) != 1:
            raise DataError(f"{self.spec}: question and answer embeddings differ in size ({sorted(dims)})")
        return dims.pop()


# ---------------------------------------------------------------- reading rows


def _lines(source: Source, file: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) streamed, without reading the whole file."""
    with source.fs.open_input_stream(file) as raw:
        for n, line in enumerate(io.BufferedReader(raw), start=1):
            try:
                yield n, line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{source.name(file)}: line {n} is not valid UTF-8 (byte {e.start} of the line); "
                                "re-save the file as UTF-8") from e


def _jsonl(source: Source, file: str, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    for n, line in _lines(source, file):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source.name(file)}: line {n} is not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{source.name(file)}: line {n} must be a JSON object, got {type(obj).__name__}")
        yield n, obj


def _csv(source: Source, file: str, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(line for _, line in _lines(source, file))
    for row in reader:
        yield reader.line_num, dict(row)


def _parquet(source: Source, file: str, columns: list[str] | None) -> Iterator[tuple[int, dict]]:
    try:
        parquet = pq.ParquetFile(file, filesystem=source.fs)
        present = [c for c in columns if c in parquet.schema_arrow.names] if columns is not None else None
        offset = 0
        for batch in parquet.iter_batches(batch_size=CHUNK, columns=present):
            for i, row in enumerate(batch.to_pylist()):
                yield offset + i + 1, row
            offset += batch.num_rows
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{source.name(file)}: cannot be read as Parquet ({e})") from e


READERS = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}


def iter_records(source: str | Path | Source, columns: list[str] | None = None) -> Iterator[tuple[str, int, dict]]:
    """(file name, row number, record) streamed from every file of the input; `columns` limits
    what a Parquet file reads (JSONL and CSV rows carry what they carry).

    Raises:
        DataError: an unreadable file, or an input with no rows at all.
    """
    source = Source.of(source)
    empty = True
    for file in source.files:
        for row, record in READERS[source.format](source, file, columns):
            empty = False
            yield source.name(file), row, record
    if empty:
        raise DataError(f"{source.spec}: the file holds no rows")


def _text(where: str, record: dict, col: str, required: bool = True) -> str:
    if col not in record:
        if not required:
            return ""
        raise DataError(f"{where} has no {col!r} column (columns: {sorted(record)}); "
                        f"rename it or pass the column name in the data config")
    value = record[col]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where} column {col!r} must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise DataError(f"{where} column {col!r} is empty")
    return value


def iter_pairs(source: str | Path | Source, cfg: DataConfig = DataConfig(),
               require_answer: bool = True) -> Iterator[dict[str, str]]:
    """Validated rows {question, answer, topic, file, row}, streamed (no duplicate check: `scan`)."""
    columns = [cfg.question_col, cfg.answer_col, cfg.topic_col]
    for file, row, rec in iter_records(source, columns):
        where = f"{file}: row {row}"
        yield {"question": _text(where, rec, cfg.question_col),
               "answer": _text(where, rec, cfg.answer_col, required=require_answer),
               "topic": _text(where, rec, cfg.topic_col, required=False), "file": file, "row": row}


# ---------------------------------------------------------------- one validating pass


def text_hash(texts: Any) -> np.ndarray:
    """64-bit hashes of stripped texts, stable across processes and machines (pandas' siphash
    with its fixed key): what splits, duplicate checks and the embedding store key rows by."""
    return pd.util.hash_array(np.asarray(texts, dtype=object)).astype(np.uint64)


def rank_keys(questions: list[str], seed: int) -> np.ndarray:
    """The split order of each question: the first 8 bytes of sha256(seed, question), big-endian
    (the order the hex digests sort in)."""
    return np.array([int.from_bytes(hashlib.sha256(f"{seed}\x00{q}".encode()).digest()[:8], "big")
                     for q in questions], dtype=np.uint64)


@dataclass
class Scan:
    """What one validating pass over the input keeps: per row, in input order."""

    q_hash: np.ndarray  # (N,) uint64
    a_hash: np.ndarray  # (N,) uint64
    q_rank: np.ndarray  # (N,) uint64, rank_keys of the question
    file: np.ndarray  # (N,) uint16 index into `files`
    row: np.ndarray  # (N,) uint32 row number within its file
    files: list[str]

    def __len__(self) -> int:
        return len(self.q_hash)

    def where(self, i: int) -> str:
        return f"{self.files[int(self.file[i])]}: row {int(self.row[i])}"


def scan(source: str | Path | Source, cfg: DataConfig = DataConfig(), require_answer: bool = True,
         chunk: int = CHUNK) -> Scan:
    """Validate every row and keep its hashes, streaming: memory is 30 bytes a row.

    Raises:
        DataError: a missing column, empty or non-text value, non-UTF-8 bytes, a duplicated pair
            (a duplicated question when answers are not required), an unreadable or empty input.
    """
    source = Source.of(source)
    files: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("q_hash", "a_hash", "q_rank", "file", "row")}
    buf: dict[str, list] = {"q": [], "a": [], "file": [], "row": []}

    def flush() -> None:
        if not buf["q"]:
            return
        parts["q_hash"].append(text_hash(buf["q"]))
        parts["a_hash"].append(text_hash(buf["a"]))
        parts["q_rank"].append(rank_keys(buf["q"], cfg.seed))
        parts["file"].append(np.array(buf["file"], dtype=np.uint16))
        parts["row"].append(np.array(buf["row"], dtype=np.uint32))
        for v in buf.values():
            v.clear()

    for pair in iter_pairs(source, cfg, require_answer):
        buf["q"].append(pair["question"])
        buf["a"].append(pair["answer"])
        buf["file"].append(files.setdefault(pair["file"], len(files)))
        buf["row"].append(pair["row"])
        if len(buf["q"]) >= chunk:
            flush()
    flush()
    result = Scan(**{k: np.concatenate(v) for k, v in parts.items()}, files=list(files))
    _refuse_duplicates(result, require_answer)
    return result


def _refuse_duplicates(s: Scan, require_answer: bool) -> None:
    keys = (s.q_hash, s.a_hash) if require_answer else (s.q_hash,)
    order = np.lexsort(keys[::-1])  # by question, then answer; stable, so equal rows keep file order
    same = np.ones(len(s) - 1, dtype=bool) if len(s) > 1 else np.zeros(0, dtype=bool)
    for k in keys:
        same &= k[order][1:] == k[order][:-1]
    if same.any():
        i = int(np.flatnonzero(same)[0])
        first, again = int(order[i]), int(order[i + 1])
        what = "pair" if require_answer else "question"
        at = f"row {int(s.row[first])}" if s.file[first] == s.file[again] else s.where(first)
        raise DataError(f"{s.where(again)} repeats the {what} at {at}; remove the duplicate")


# ---------------------------------------------------------------- leak-free splits


@dataclass
class SplitPlan:
    """The split of every distinct question: `split_of(q_hash)` for any row, anywhere."""

    questions: np.ndarray  # (Q,) sorted uint64 question hashes
    split: np.ndarray  # (Q,) int8 index into SPLITS

    def split_of(self, q_hash: np.ndarray) -> np.ndarray:
        """(N,) int8 split index of each row's question hash (every hash must be a known question)."""
        idx = np.searchsorted(self.questions, q_hash)
        if len(idx) and (idx.max(initial=0) >= len(self.questions) or (self.questions[idx] != q_hash).any()):
            raise DataError("a row's question is not in the split plan: the input changed since it was scanned")
        return self.split[idx]

    def counts(self, rows: np.ndarray) -> dict[str, int]:
        return {name: int((rows == i).sum()) for i, name in enumerate(SPLITS)}


def plan_splits(s: Scan, cfg: DataConfig) -> SplitPlan:
    """Cut the pairs into train/val/test by connected groups of shared questions *or* answers,
    ordered by the seeded rank of their questions; val and test take their share of distinct
    questions. Where no two pairs share an answer, this is a cut over distinct questions.

    Raises:
        DataError: too few questions, or groups so large that no training split is left.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    questions, q_idx = np.unique(s.q_hash, return_inverse=True)
    answers, a_idx = np.unique(s.a_hash, return_inverse=True)
    n_q = len(questions)
    nodes = n_q + len(answers)
    graph = coo_matrix((np.ones(len(s), dtype=np.int8), (q_idx, n_q + a_idx)), shape=(nodes, nodes))
    _, label = connected_components(graph, directed=False)
    group = label[:n_q]  # (Q,) the group of each distinct question
    rank = np.zeros(n_q, dtype=np.uint64)
    rank[q_idx] = s.q_rank  # one rank per distinct question
    by_group = pd.DataFrame({"group": group, "rank": rank}).groupby("group")["rank"].agg(["min", "size"])
    by_group = by_group.sort_values("min", kind="stable")
    n_test, n_val = round(n_q * cfg.test_fraction), round(n_q * cfg.val_fraction)
    if n_q - n_test - n_val < 2:
        raise DataError(f"only {n_q} distinct questions: too few to leave a training split")
    before = by_group["size"].cumsum().to_numpy() - by_group["size"].to_numpy()  # questions placed before each group
    which = np.where(before < n_test, 2, np.where(before < n_test + n_val, 1, 0)).astype(np.int8)
    split_of_group = pd.Series(which, index=by_group.index)
    split = split_of_group.loc[group].to_numpy().astype(np.int8)
    if (split == 0).sum() < 2:
        raise DataError(f"questions and answers are so interlinked that one group holds most of the {n_q} questions "
                        "and no training split is left; lower data.val_fraction and data.test_fraction")
    return SplitPlan(questions, split)


# ---------------------------------------------------------------- small inputs in memory


def load_qa(source: str | Path | Source, cfg: DataConfig = DataConfig(), require_answer: bool = True) -> pd.DataFrame:
    """Validated pairs of a small input as a DataFrame (question, answer, topic, row): for test
    files, the demo and tests. Large inputs stream (`scan`, then Ray Data in jobs/)."""
    scan(source, cfg, require_answer)  # the duplicate check
    return pd.DataFrame.from_records(
        [{k: p[k] for k in ("question", "answer", "topic", "row")} for p in iter_pairs(source, cfg, require_answer)],
        columns=["question", "answer", "topic", "row"])


def split_pairs(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """`df` with a `split` column, cut by `plan_splits` (the same plan a streamed input gets)."""
    s = Scan(text_hash(df["question"]), text_hash(df["answer"]), rank_keys(df["question"].tolist(), cfg.seed),
             np.zeros(len(df), np.uint16), np.arange(1, len(df) + 1, dtype=np.uint32), ["frame"])
    plan = plan_splits(s, cfg)
    return df.assign(split=np.asarray(SPLITS)[plan.split_of(s.q_hash)])
