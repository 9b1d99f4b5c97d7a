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

from cube.data import store
from cube.data.qa import SPLITS, DataConfig, DataError, Source, plan_splits, scan
from cube.data.split import Moments, SplitData, filesystem
from cube.job_config import TrainConfig
from jobs.common import ensure_ray, user_error_in
from jobs.embedding import embed_source
from jobs.stages import LIGHT, ROWS_PER_TASK, PairRows, read_source, read_tasks

log = logging.getLogger("cube.data")
MIN_ROWS_PER_FILE = 50_000  # fewer, larger split files
# ... but none larger than this: Ray Train's reads give each split file to one task whole
# (jobs.stages.split_rows), so a file's size bounds what one read holds.
MAX_SPLIT_FILE_BYTES = 256 * 2**20
SPLIT_OBJECT_STORE = 256 * 2**20  # bytes of blocks in flight while the split is written (at least 4 blocks)


@dataclass
class Prepared:
    rows: dict[str, int]
    dim: int
    moments: Moments
    byo: bool  # the vectors came with the input


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
    columns = [cfg.data.question_col, cfg.data.answer_col, cfg.data.topic_col]
    folder = None
    if dim is None:
        identity, dtype = cfg.teacher.identity(), cfg.pipeline.store_dtype
        folder = store.open_store(store.default_store(identity, dtype), identity, dtype)
        wanted = np.union1d(s.q_hash, s.a_hash)
        missing = len(np.setdiff1d(wanted, store.keys(folder), assume_unique=True))
        if missing:  # the keys were read from the store above: 8 bytes a text
            folder = embed_source(source, (cfg.data.question_col, cfg.data.answer_col), cfg.teacher, cfg.pipeline,
                                  total=missing)
        else:
            log.info("all %s texts are in the embedding store %s already", f"{len(wanted):,}", folder)
        dim = store.dataset(folder).schema.field("vector").type.list_size
    else:
        columns += [cfg.data.question_embedding_col, cfg.data.answer_embedding_col]
        log.info("%s brings its own %d-D embeddings (columns %s, %s): no teacher embeds them", data, dim,
                 cfg.data.question_embedding_col, cfg.data.answer_embedding_col)
    del s  # the hashes have served; the plan keeps one per distinct question
    fs, path = filesystem(split_root)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    rows = read_source(source, columns, cfg.pipeline, include_paths=folder is None).map_batches(
        PairRows.apply, fn_kwargs={"data": _plain(cfg.data), "plan": ray.put(plan), "dim": dim,
                                   "store_folder": str(folder) if folder else None},
        batch_format="pyarrow", batch_size=ROWS_PER_TASK, concurrency=read_tasks(cfg.pipeline), **LIGHT)
    # Bounded: a few blocks in flight rather than Ray Data's share of the node's object store,
    # whose shared-memory pages stay resident once touched, for as long as Ray runs.
    limits = rows.context.execution_options.resource_limits
    row_bytes = 8 * dim + 512  # two float32 vectors and their texts
    in_flight = max(SPLIT_OBJECT_STORE, 4 * ROWS_PER_TASK * row_bytes)
    file_rows = MAX_SPLIT_FILE_BYTES // row_bytes
    rows.context.execution_options.resource_limits = limits.copy(object_store_memory=in_flight)
    try:
        rows.write_parquet(split_root if "://" in split_root else path, filesystem=fs, partition_cols=["split"],
                           min_rows_per_file=min(MIN_ROWS_PER_FILE, file_rows), max_rows_per_file=file_rows,
                           ray_remote_args=LIGHT)
    except Exception as e:
        fs.delete_dir_contents(path, missing_dir_ok=True)
        cause = user_error_in(e, DataError)
        if cause is not None:
            raise cause from None
        raise
    finally:
        rows.context.execution_options.resource_limits = limits
    split = SplitData(split_root)
    written = {name: split.count(name) for name in SPLITS}
    if written != counts:
        raise RuntimeError(f"the split dataset holds {written} rows, the plan {counts}; rerun (nothing was trained)")
    return Prepared(written, dim, split.moments("train"), folder is None)


def _plain(cfg: DataConfig) -> dict[str, Any]:
    from cube.config import to_dict

    return to_dict(cfg)
