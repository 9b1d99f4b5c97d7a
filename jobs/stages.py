"""The light Ray Data stages: reading the input, distinct texts, skipping what the store holds,
turning input rows into split rows, collecting parts. They need pandas, pyarrow and numpy, never
torch, so the worker processes that run them stay small (a process that imports torch holds a
few hundred MB more: on a small node, ten of them are the whole memory budget).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from cube.data import store
from cube.data.qa import SPLITS, DataConfig, DataError, Source, SplitPlan, text_hash
from jobs.common import ResourceError, configure_ray_data, require_resources

if TYPE_CHECKING:
    from cube.job_config import PipelineOptions

# The light stages (read, distinct texts, writes) take a sliver of a CPU each: with Ray's default
# of one CPU per task they would wait behind the teacher actors. Each task's worker process ends
# with its task (max_calls=1): a process that decoded blocks of vectors keeps their memory while it
# idles in Ray's worker pool, and a few such idle workers would be the node's memory. The skip
# filter is an actor that idles between batches, so it reserves none. Ray Data's Parquet file
# listing still asks for a whole CPU and takes no options: see check_room_for_listing.
LIGHT = {"num_cpus": 0.25, "max_calls": 1}
# Rows a light task takes at once. A worker process per task (above) costs about a second of CPU:
# small input blocks (Ray Data cuts even a small file into several) are gathered into one task.
ROWS_PER_TASK = 8_192
IDLE_ACTOR = {"num_cpus": 0}
# max_restarts=0 on our actors: with restarts on, Ray's core worker prints an error line about
# constructor arguments in the object store on every run. Nothing is lost without them: a dead
# actor fails the job loudly, and the rerun embeds only what no finished part holds.
NO_RESTART = {"max_restarts": 0}
def without_restarts(map_batches: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`map_batches(..., max_restarts=0)`. Ray 2.60 has no named parameter for it and warns that
    the catch-all kwargs it goes through are deprecated, though its own actor pool reads it from
    there (actor_pool_map_operator.py): that one warning is silenced, by its exact message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return map_batches(*args, **kwargs, **NO_RESTART)


class SkipDone:
    """Drops texts whose key is in `done`: the sorted keys the store held when the driver looked
    (the driver reads the store, since this actor may run on a node without it)."""

    def __init__(self, done: np.ndarray) -> None:
        self.done = done

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        keys = text_hash(batch["text"])
        idx = np.minimum(np.searchsorted(self.done, keys), max(len(self.done) - 1, 0))
        seen = (self.done[idx] == keys) if len(self.done) else np.zeros(len(keys), bool)
        return batch[~seen]


def texts_of(columns: tuple[str, ...]) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """A batch of rows → its distinct stripped texts of `columns` (blank and missing ones dropped:
    validation has already refused the rows that need them)."""

    def explode(batch: pd.DataFrame) -> pd.DataFrame:
        parts = [batch[c].dropna().astype(str).str.strip() for c in columns if c in batch]
        texts = pd.unique(pd.concat(parts)) if parts else np.array([], dtype=object)
        return pd.DataFrame({"text": [t for t in texts if t]})

    return explode


def with_question_keys(column: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def add(batch: pd.DataFrame) -> pd.DataFrame:
        q = batch[column].astype(str).str.strip()
        return pd.DataFrame({"text": q, "question": q})

    return add


class PartSink:
    """A Datasink that turns each block into one complete Parquet part in `folder`, on the
    driver's node (where `folder` is): for outputs that the driver must collect."""

    def __new__(cls, folder: Path, make_table: Callable[[pd.DataFrame], pa.Table]):
        from ray.data import Datasink
        from ray.data.block import BlockAccessor

        class _PartSink(Datasink):
            def write(self, blocks: Iterable, ctx) -> int:
                rows = 0
                for block in blocks:
                    df = BlockAccessor.for_block(block).to_pandas()
                    if len(df):
                        store.write_part(folder, make_table(df))
                        rows += len(df)
                return rows

            @property
            def supports_distributed_writes(self) -> bool:
                return False

        return _PartSink()


def generated_table(df: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(df[["question", "answer", "generator"]].assign(key=text_hash(df["question"])),
                                preserve_index=False)


def check_room_for_listing(opts: PipelineOptions) -> None:
    """Ray Data lists Parquet files in a task that needs one whole free CPU on one node (and
    takes no options); if the teacher actors hold the rest, the read waits forever. Refuse up
    front, placing the actors and the listing task node by node as Ray would have to.

    Raises:
        ValueError: naming the settings to change.
    """
    actor = {"CPU": opts.cpus_per_actor, "GPU": opts.num_gpus}
    try:
        require_resources([actor] * opts.concurrency + [{"CPU": 1.0}], f"{opts.concurrency} teacher actors and "
                          "the one free CPU that Ray Data needs to list a Parquet file")
    except ResourceError as e:
        raise ValueError(f"{e}; lower pipeline.concurrency or pipeline.cpus_per_actor") from None


def read_tasks(opts: PipelineOptions | None) -> int:
    """Read tasks at once: `pipeline.read_concurrency`, or one per four of the cluster's CPUs.
    Each decodes a row group of the input at a time (a few hundred MB to a GB for 64k rows of
    vectors), and a read outpacing what follows only fills the object store."""
    if opts is not None and opts.read_concurrency:
        return opts.read_concurrency
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)) // 4)


# Ray 2.60's Parquet reader (DataSourceV2) reads the footers of a dataset's files on a pool of
# actors that it starts each time the dataset executes: 32 by default, each a new worker process,
# about 3 s on a 2-core node for a one-file input. Sized here by the files: one per footer batch.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_ACTOR = 10  # Ray's footer batch: files one actor reads per call
MAX_FOOTER_ACTORS = 32  # Ray's default, for a dataset of hundreds of files on object storage


def parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The Parquet files under a folder, at any depth."""
    return [f.path for f in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")]


def read_parquet(files: list[str], filesystem: pafs.FileSystem | None = None, columns: list[str] | None = None,
                 **kwargs: Any):
    """`ray.data.read_parquet` of these files (the input: `read_source`, which applies
    `configure_ray_data`), with a footer-reader pool sized to the files (one actor per ten
    files, 1 to 32; Ray reads the number from its environment as the dataset is built).

    Ray's current reader cuts files into reads by row group, so one 10 GB file streams through
    many small reads. (The V1 reader, `DataContext.use_datasource_v2 = False`, gives a whole file
    to one task: it put a 9 GB input file into the object store at once, spilling it to disk.)"""
    import ray.data

    actors = min(MAX_FOOTER_ACTORS, max(1, -(-len(files) // FILES_PER_FOOTER_ACTOR)))
    before = os.environ.get(FOOTER_ACTORS_ENV)
    os.environ[FOOTER_ACTORS_ENV] = str(actors)
    try:
        ds = ray.data.read_parquet(files, filesystem=filesystem, **kwargs)
    finally:
        if before is None:
            del os.environ[FOOTER_ACTORS_ENV]
        else:
            os.environ[FOOTER_ACTORS_ENV] = before
    if columns is None:
        return ds
    return ds.select_columns([*columns, *(["path"] if kwargs.get("include_paths") else [])])  # pushed into the read


def read_source(source: Source, columns: list[str], opts: PipelineOptions | None = None, include_paths: bool = False):
    """A streaming Ray dataset of the input: Parquet read for those of `columns` it has (text
    columns as strings). JSON Lines and CSV readers cannot leave columns out; the stages that
    follow take theirs by name. No projection stage: each of its tasks was a worker process of
    its own (LIGHT), and asking the dataset for its columns read the input once more."""
    import pyarrow.csv as pcsv
    import ray.data

    configure_ray_data()
    files = list(source.files)
    reads = {**LIGHT, "concurrency": read_tasks(opts)}
    if source.format == "jsonl":
        # pyarrow's JSON reader reads JSON Lines (Ray's lines=True takes no filesystem)
        ds = ray.data.read_json(files, filesystem=source.fs, include_paths=include_paths, **reads)
    elif source.format == "csv":
        options = pcsv.ConvertOptions(column_types={c: pa.string() for c in columns})
        ds = ray.data.read_csv(files, filesystem=source.fs, convert_options=options, include_paths=include_paths,
                               **reads)
    else:
        if opts is not None:
            check_room_for_listing(opts)
        present = [c for c in columns if c in (source.columns() or [])]
        ds = read_parquet(files, filesystem=source.fs, columns=present, include_paths=include_paths, **reads)
    return ds


def split_rows(split_root: str, split: str, columns: list[str], seed: int, opts: PipelineOptions | None = None):
    """One split of a run's split dataset as Ray Data reads it for Ray Train: its files in a
    seeded order that changes every epoch (the epoch's execution index), a few reads at once.

    Read by Ray Data's V1 Parquet reader, which gives each file to one task and starts no
    footer-reader pool: Ray Train executes this dataset again every epoch, and on a 2-core node
    the pool of the current reader, even of one actor, cost about 0.9 s an epoch (1.6 s against
    0.75 s for the suite's 383-row split). The split's files are ours, at most
    `jobs.dataset.MAX_SPLIT_FILE_BYTES` each, so a whole-file read stays small; an input file of
    any size goes through `read_parquet`. The V1 reader samples a file on the driver as it is
    called; that sampling's progress bar would cut into the training bar, so it is off meanwhile."""
    import ray.data

    from cube.data.split import filesystem

    configure_ray_data()
    fs, path = filesystem(split_root)
    ctx = ray.data.DataContext.get_current()
    v2, bars = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2 = ctx.enable_progress_bars = False
    try:
        ds = ray.data.read_parquet(parquet_files(fs, f"{path}/split={split}"), filesystem=fs, columns=columns,
                                   shuffle=ray.data.FileShuffleConfig(seed=seed),
                                   concurrency=max(2, read_tasks(opts)), **LIGHT)
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = v2, bars
    ds.context.enable_progress_bars = bars  # the dataset took a copy (the reader is chosen as it is built)
    return ds


class PairRows:
    """One block of input rows → rows of the split dataset: stripped texts, the split of each
    row's question (from the plan), and its question and answer vectors (from the input's own
    embedding columns, or looked up in the embedding store). Run as a plain task beside the read
    (`apply`: Ray Data fuses the two); the plan comes from the object store once a process."""

    plans: dict[str, SplitPlan] = {}

    def __init__(self, data: dict[str, Any], plan: Any, dim: int, store_folder: str | None) -> None:
        import ray

        self.cfg = DataConfig(**data)
        if isinstance(plan, ray.ObjectRef):
            if plan.hex() not in PairRows.plans:
                PairRows.plans[plan.hex()] = ray.get(plan)
            plan = PairRows.plans[plan.hex()]
        self.plan: SplitPlan = plan
        self.dim, self.store_folder = dim, store_folder

    @staticmethod
    def apply(batch: pa.Table, *, data: dict[str, Any], plan: Any, dim: int, store_folder: str | None) -> pa.Table:
        """The stage as a function, which is how map_batches runs it as a task."""
        return PairRows(data, plan, dim, store_folder)(batch)

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
