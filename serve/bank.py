"""The answer bank a served run searches: the run's bank artefact (RUN/bank: every distinct answer
of its corpus, cube/data/bank.py), plus any extra answers given at start (`--answers FILE`: JSONL,
CSV or Parquet with an `answer` column), whose vectors come from the embedding store.

`cube serve --answers FILE` embeds the answers the store lacks before the app is built (a Ray Data
job, jobs/serve.py); `load_bank` runs in the replicas and only reads. No Serve here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cube.data import store
from cube.data.bank import AnswerBank
from cube.data.qa import DataError, iter_records
from cube.data.rundir import RunDir

log = logging.getLogger("cube.serve")
ANSWER_COLUMN = "answer"


def read_answers(path: str | Path, column: str = ANSWER_COLUMN) -> list[str]:
    """The distinct, stripped answers of a JSONL/CSV/Parquet file, in file order.

    Raises:
        DataError: the file is missing or empty, has no such column, or a value is not text.
    """
    seen: dict[str, None] = {}
    for file, row, record in iter_records(path, [column]):
        if column not in record:
            raise DataError(f"{file}: row {row} has no {column!r} column (columns: {sorted(record)})")
        value = record[column]
        if not isinstance(value, str):
            raise DataError(f"{file}: row {row} column {column!r} must be text, got {type(value).__name__}")
        if value.strip():
            seen.setdefault(value.strip(), None)
    if not seen:
        raise DataError(f"{path}: no non-empty {column!r} values")
    return list(seen)


def load_bank(run: RunDir, a_mean: torch.Tensor, answers: str | None = None,
              store_folder: str | None = None) -> tuple[AnswerBank, int]:
    """(bank, number of extra answers it holds beyond the run's): the run's bank artefact, read
    from the run's path or URI, plus the answers of `answers` that it lacks.

    Raises:
        BankError: the run has no bank.
        store.StoreError: an extra answer has no vector (`cube serve --answers FILE` embeds them first).
    """
    bank = AnswerBank.read(run.bank_root(), a_mean)
    if not answers:
        return bank, 0
    known = set(bank.texts)
    extra = [t for t in read_answers(answers) if t not in known]
    if not extra:
        return bank, 0
    if store_folder is None:
        raise store.StoreError(f"extra answers from {answers} need an embedding store folder; "
                               "`cube serve --answers FILE` embeds them and passes it")
    return bank.extended(extra, store.vectors_for(Path(store_folder), extra)), len(extra)
