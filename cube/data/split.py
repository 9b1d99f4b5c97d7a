"""A run's split: every pair with its vectors as a Parquet dataset, read as a stream, never whole.

    SPLIT_ROOT/split=train/*.parquet     question, answer, topic, q_vec, a_vec
    SPLIT_ROOT/split=val/*.parquet       (q_vec, a_vec: fixed-size lists of float32)
    SPLIT_ROOT/split=test/*.parquet

The root is a folder of the run, or a URI beside it (`cube train --output s3://…` writes it
there, and Ray Train's workers read their shards from it). Memory here depends on the batch
size, not on the split's size, except where a caller asks for a held-out split whole
(`held_out`): a validation or test split, ranked against its full pool of answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import torch

from cube.data.qa import SPLITS
from cube.eval.metrics import HeldOut, Split, sample_rows

VECTORS = ("q_vec", "a_vec")
TEXTS = ("question", "answer", "topic")
BATCH = 16_384  # rows per read batch: the unit of memory of every stream here (~50 MB of 384-D pairs)
# ... and one batch read ahead, one file at a time. Arrow's defaults (16 batches, 4 files) held
# about 1.9 GB more than one batch while the ridge baseline streamed a 2M-pair training split.
READAHEAD = {"batch_readahead": 1, "fragment_readahead": 1}
PROBE_ROWS = 20_000  # the training probe's cap: a rank holds it beside the validation pool


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a path or URI, and the path on it."""
    if "://" in root:
        return pafs.FileSystem.from_uri(root)
    return pafs.LocalFileSystem(), root


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a (rows, dim) float32 array of its own (writable: torch shares
    it without a copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, arr.type.list_size), np.float32)
    # flatten(), not .values: a sliced array's .values is its whole parent's
    return np.array(arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1), dtype=np.float32)


@dataclass
class Moments:
    """Training-split means of questions and answers, from one streaming pass (float64 sums)."""

    count: int
    q_mean: np.ndarray  # (E,) float64
    a_mean: np.ndarray


class SplitData:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self.path = filesystem(self.root)

    def dataset(self, name: str) -> pads.Dataset:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return pads.dataset(f"{self.path}/split={name}", filesystem=self.fs, format="parquet")

    def uri(self, name: str) -> str:
        """Where a split's files are, as Ray Data's read_parquet takes it."""
        return f"{self.root}/split={name}"

    def count(self, name: str) -> int:
        return self.dataset(name).count_rows()

    def dim(self) -> int:
        return self.dataset("train").schema.field("q_vec").type.list_size

    def batches(self, name: str, columns: list[str] | None = None, batch_size: int = BATCH) -> Iterator[pa.RecordBatch]:
        yield from self.dataset(name).to_batches(columns=columns, batch_size=batch_size, **READAHEAD)

    def vector_batches(self, name: str, batch_size: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(q, a) float32 arrays, `batch_size` rows at a time, in file order."""
        for batch in self.batches(name, list(VECTORS), batch_size):
            if batch.num_rows:
                yield vectors(batch.column("q_vec")), vectors(batch.column("a_vec"))

    def moments(self, name: str = "train") -> Moments:
        """Means of the split's question and answer vectors, streamed."""
        n, q_sum, a_sum = 0, 0.0, 0.0
        for q, a in self.vector_batches(name):
            n += len(q)
            q_sum = q_sum + q.sum(0, dtype=np.float64)
            a_sum = a_sum + a.sum(0, dtype=np.float64)
        if n == 0:
            raise ValueError(f"{self.root}: the {name} split is empty")
        return Moments(n, np.asarray(q_sum) / n, np.asarray(a_sum) / n)

    def table(self, name: str, columns: list[str] | None = None, limit: int | None = None) -> pa.Table:
        """A whole split (or its first `limit` rows) in memory: for held-out splits and tests."""
        if limit is None:
            return self.dataset(name).to_table(columns=columns)
        return self.dataset(name).head(limit, columns=columns)

    def split(self, name: str, limit: int | None = None) -> Split:
        """A split's vectors in memory (the in-process paths: baselines on small data, tests)."""
        t = self.table(name, list(VECTORS), limit)
        return Split(torch.from_numpy(vectors(t.column("q_vec"))), torch.from_numpy(vectors(t.column("a_vec"))))

    def held_out(self, name: str, questions: int = 0, seed: int = 0, limit: int | None = None) -> HeldOut:
        """The split's questions ranked against its distinct answers (or, with `limit`, its first
        rows: the training probe). With `questions` > 0, a seeded sample of that many questions
        is scored, always against the full pool."""
        texts = self.table(name, ["question", "answer"], limit)
        asked, answers = texts.column("question").to_pylist(), texts.column("answer").to_pylist()
        target, pool = pd.factorize(pd.Series(answers), sort=False)
        first = pd.Series(np.arange(len(answers))).groupby(target).first().to_numpy()  # a row of each answer
        rows = sample_rows(asked, questions, seed)
        # Vectors only of the rows it needs: the sampled questions and one row per distinct answer.
        q, a = self._take(name, "q_vec", rows), self._take(name, "a_vec", first)
        return HeldOut(torch.from_numpy(q), torch.from_numpy(a), torch.as_tensor(target[rows], dtype=torch.long),
                       [asked[i] for i in rows], list(pool))

    def probe(self, val: HeldOut, questions: int = 0, seed: int = 0) -> HeldOut:
        """The training probe: the first training pairs, as many as the validation pool holds
        answers (at most PROBE_ROWS), scored like validation, so that train-vs-val gaps are not
        an artefact of pool size (below the cap)."""
        return self.held_out("train", questions, seed, limit=min(len(val.pool), PROBE_ROWS))

    def _take(self, name: str, column: str, rows: np.ndarray) -> np.ndarray:
        """The `column` vectors of the given rows (in the dataset's row order), reading only the
        row groups that hold them."""
        if not len(rows):
            return np.zeros((0, self.dim()), np.float32)
        return vectors(self.dataset(name).take(pa.array(rows), columns=[column]).column(column))

    def shuffled(self, name: str, batch_size: int, seed: int, buffer: int = 8 * BATCH):
        """A function from the epoch to that epoch's full batches (q, a tensors), in a new order
        every epoch: fragments (files) in a seeded random order, rows through a shuffle buffer
        of `buffer` rows. Memory is the buffer; what Tune trials and in-process runs train on."""
        fragments = list(self.dataset(name).get_fragments())

        def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            rng = np.random.default_rng([seed, epoch])
            pool_q: list[np.ndarray] = []
            pool_a: list[np.ndarray] = []
            held = 0

            def drain(final: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                nonlocal pool_q, pool_a, held
                q, a = np.concatenate(pool_q), np.concatenate(pool_a)
                order = rng.permutation(len(q))
                keep = len(q) if final else len(q) // 2  # emit half, keep half mixing with what comes next
                cut = (keep // batch_size) * batch_size
                for start in range(0, cut, batch_size):
                    idx = order[start : start + batch_size]
                    yield torch.from_numpy(q[idx]), torch.from_numpy(a[idx])
                rest = order[cut:]
                pool_q, pool_a, held = [q[rest]], [a[rest]], len(rest)

            for i in rng.permutation(len(fragments)):
                for batch in fragments[i].to_batches(columns=list(VECTORS), batch_size=BATCH, **READAHEAD):
                    pool_q.append(vectors(batch.column("q_vec")))
                    pool_a.append(vectors(batch.column("a_vec")))
                    held += batch.num_rows
                    if held >= buffer:
                        yield from drain(final=False)
            if held:
                yield from drain(final=True)  # the last partial batch is dropped

        return epoch_batches
