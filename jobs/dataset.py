"""A run's split dataset from any input, streamed through Ray Data:

    driver: scan the input (validate, 30 bytes a row) ─▶ plan leak-free splits
    Ray Data: read ─▶ PairRows (texts, split, vectors) ─▶ write_parquet(SPLIT_ROOT, by split)
    driver: one streaming pass over train for the centring means

Vectors come from the input itself (bring your own embeddings: `question_embedding` and
`answer_embedding` columns) or from the teacher's embedding store, which `embed_source` fills
first. No process holds the whole input: the driver keeps hashes, each task one block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cube.data import store
from cube.data.qa import SPLITS, DataConfig, DataError, Source, SplitPlan, plan_splits, scan, text_hash
from cube.data.split import Moments, SplitData, filesystem
from cube.job_config import TrainConfig
from jobs.common import ensure_ray, quiet_ray_data, user_error_in
from jobs.embedding import LIGHT, embed_source, read_source, without_restarts

log = logging.getLogger("cube.data")
ROWS_PER_TASK = 20_000  # rows a PairRows call handles: one filtered store scan each (teacher path)
MIN_ROWS_PER_FILE = 50_000  # fewer, larger split files


@dataclass
class Prepared:
    rows: dict[str, int]
    dim: int
    moments: Moments
    byo: bool  # the vectors came with the input


class PairRows:
    """One block of input rows → rows of the split dataset: stripped texts, the split of each
    row's question (from the plan), and its question and answer vectors (from the input's own
    embedding columns, or looked up in the embedding store)."""

    def __init__(self, data: dict[str, Any], plan: Any, dim: int, store_folder: str | None) -> None:
        import ray

        self.cfg = DataConfig(**data)
        self.plan: SplitPlan = ray.get(plan) if isinstance(plan, ray.ObjectRef) else plan
        self.dim, self.store_folder = dim, store_folder

    def __call__(self, batch: pa.Table) -> pa.Table:
        c = self.cfg
        q = pc.utf8_trim_whitespace(batch.column(c.question_col).cast(pa.string()))
        a = pc.utf8_trim_whitespace(batch.column(c.answer_col).cast(pa.string()))
        topic = (pc.fill_null(batch.column(c.topic_col).cast(pa.string()), "") if c.topic_col in batch.column_names
                 else pa.array([""] * batch.num_rows, pa.string()))
        split = self.plan.split_of(text_hash(q.to_pylist()))
        if self.store_folder is None:
            q_vec, a_vec = (self._own(batch, col) for col in (c.question_embedding_col, c.answer_embedding_col))
        else:
            q_vec, a_vec = self._stored(q.to_pylist()), self._stored(a.to_pylist())
        return pa.table({"question": q, "answer": a, "topic": topic, "split": pa.array(np.asarray(SPLITS)[split]),
                         "q_vec": q_vec, "a_vec": a_vec})

    def _own(self, batch: pa.Table, col: str) -> pa.FixedSizeListArray:
        """An input embedding column as float32 rows of `dim`; a row of another length or with a
        non-finite value is a DataError naming its file and question."""
        column = batch.column(col).combine_chunks()
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(column).cast(pa.float32()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != self.dim) if len(lengths) else np.zeros(0, int)
        if not len(bad):
            finite = np.isfinite(flat.reshape(-1, self.dim)).all(1)
            bad = np.flatnonzero(~finite)
            problem = "holds a NaN or infinite value"
        else:
            problem = f"has {int(lengths[bad[0]])} values where the first row has {self.dim}"
        if len(bad):
            i = int(bad[0])
            where = batch.column("path")[i].as_py() if "path" in batch.column_names else "the input"
            question = batch.column(self.cfg.question_col)[i].as_py()
            raise DataError(f"{where}: the row with question {question!r}: column {col!r} {problem}")
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), self.dim)

    def _stored(self, texts: list[str]) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(
            pa.array(store.vectors_for(self.store_folder, texts).reshape(-1)), self.dim)


def prepare_split(data: str, cfg: TrainConfig, split_root: str) -> Prepared:
    """Validate and split the input, attach every pair's vectors, and write the split dataset to
    `split_root` (a folder or a URI; emptied first). The teacher's `dim` is checked against
    vectors the input brings.

    Raises:
        DataError: bad rows (before anything is written), or bad vectors (found while writing:
            the partial split is removed).
    """
    import ray

    source = Source.of(data)
    dim = source.embedding_dim(cfg.data)
    s = scan(source, cfg.data)
    plan = plan_splits(s, cfg.data)
    counts = plan.counts(plan.split_of(s.q_hash))
    log.info("%s: %s pairs; split by shared questions and answers into %s", data, f"{len(s):,}",
             ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    ensure_ray()
    quiet_ray_data()
    columns = [cfg.data.question_col, cfg.data.answer_col, cfg.data.topic_col]
    folder = None
    if dim is None:
        texts = len(np.unique(s.q_hash)) + len(np.unique(s.a_hash))
        folder = embed_source(source, (cfg.data.question_col, cfg.data.answer_col), cfg.teacher, cfg.pipeline,
                              total=texts)
        dim = store.dataset(folder).schema.field("vector").type.list_size
    else:
        columns += [cfg.data.question_embedding_col, cfg.data.answer_embedding_col]
        log.info("%s brings its own %d-D embeddings (columns %s, %s): no teacher embeds them", data, dim,
                 cfg.data.question_embedding_col, cfg.data.answer_embedding_col)
    del s  # the hashes have served; the plan keeps one per distinct question
    fs, path = filesystem(split_root)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    rows = without_restarts(
        read_source(source, columns, cfg.pipeline, include_paths=folder is None).map_batches, PairRows,
        fn_constructor_kwargs={"data": _plain(cfg.data), "plan": ray.put(plan), "dim": dim,
                               "store_folder": str(folder) if folder else None},
        batch_format="pyarrow", batch_size=ROWS_PER_TASK, compute=_pool(), **LIGHT)
    try:
        rows.write_parquet(split_root if "://" in split_root else path, filesystem=fs, partition_cols=["split"],
                           min_rows_per_file=MIN_ROWS_PER_FILE, ray_remote_args=LIGHT)
    except Exception as e:
        fs.delete_dir_contents(path, missing_dir_ok=True)
        cause = user_error_in(e, DataError)
        if cause is not None:
            raise cause from None
        raise
    split = SplitData(split_root)
    written = {name: split.count(name) for name in SPLITS}
    if written != counts:
        raise RuntimeError(f"the split dataset holds {written} rows, the plan {counts}; rerun (nothing was trained)")
    return Prepared(written, dim, split.moments("train"), folder is None)


def _plain(cfg: DataConfig) -> dict[str, Any]:
    from cube.config import to_dict

    return to_dict(cfg)


def _pool():
    import ray.data

    return ray.data.ActorPoolStrategy(size=1)  # it loads the plan once; the input's read tasks run beside it
