"""The answer bank a served run searches: every distinct answer of the run's corpus (all splits),
plus any extra answers given at start (`--answers FILE`: JSONL, CSV or Parquet with an `answer`
column), whose vectors come from the embedding store (embedded once, then read from the cache).

`cube serve --answers FILE` embeds the answers the store lacks before the app is built (a Ray Data
job, jobs/serve.py); `load_bank` runs in the replicas and only reads. No Serve here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cube.data import store
from cube.data.qa import DataError, iter_records
from cube.data.rundir import RunDir
from cube.eval.answering import AnswerBank

log = logging.getLogger("cube.serve")
ANSWER_COLUMN = "answer"


def corpus_answers(run: RunDir) -> tuple[list[str], np.ndarray]:
    """Every distinct answer of the run's split.parquet (all splits), with its vector."""
    data = run.data()
    first = ~data.frame["answer"].duplicated().to_numpy()
    return data.frame["answer"][first].tolist(), data.a[first]


def read_answers(path: str | Path, column: str = ANSWER_COLUMN) -> list[str]:
    """The distinct, stripped answers of a JSONL/CSV/Parquet file, in file order.

    Raises:
        DataError: the file is missing or empty, has no such column, or a value is not text.
    """
    path = Path(path)
    seen: dict[str, None] = {}
    for row, record in iter_records(path):
        if column not in record:
            raise DataError(f"{path}: row {row} has no {column!r} column (columns: {sorted(record)})")
        value = record[column]
        if not isinstance(value, str):
            raise DataError(f"{path}: row {row} column {column!r} must be text, got {type(value).__name__}")
        if value.strip():
            seen.setdefault(value.strip(), None)
    if not seen:
        raise DataError(f"{path}: no non-empty {column!r} values")
    return list(seen)


def load_bank(
    run: RunDir, a_mean: torch.Tensor, answers: str | None = None, store_folder: str | None = None
) -> tuple[AnswerBank, int]:
    """(bank, number of extra answers it holds beyond the corpus).

    Raises:
        store.StoreError: an extra answer has no vector (`cube serve --answers FILE` embeds them first).
    """
    texts, vectors = corpus_answers(run)
    extra: list[str] = []
    if answers:
        known = set(texts)
        extra = [t for t in read_answers(answers) if t not in known]
        if extra:
            if store_folder is None:
                raise store.StoreError(f"extra answers from {answers} need an embedding store folder; "
                                       "`cube serve --answers FILE` embeds them and passes it")
            vectors = np.concatenate([vectors, store.vectors_for(Path(store_folder), extra)])
    return AnswerBank(texts + extra, vectors, a_mean), len(extra)
