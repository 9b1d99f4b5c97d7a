"""Ray Train around the cube's one training loop: a run folder in, a trained run folder out.

    prepare_run: validate + split + embed (cached) the data into the split dataset (jobs/dataset.py)
    fit_run:     a TorchTrainer (DDP: gloo on CPU, NCCL on GPU) whose workers each stream their
                 shard of the training split through Ray Data into cube.train.loop.fit
    train:       both, then the held-out comparison (eval.json), the answer bank and the curves

Everything a Ray worker runs lives in this importable module, never in an entrypoint that may
be `__main__` (Ray would pickle it by value). `cube train` (jobs/train.py) is the command line.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cube.config import from_dict, save_config, to_dict
from cube.data.bank import AnswerBank, write_bank_from_split
from cube.data.qa import DataError, Source
from cube.data.rundir import RunDir, write_json
from cube.data.split import SplitData
from cube.data.storage import Storage
from cube.eval.report import evaluate_run
from cube.job_config import DecoderJobConfig, TrainConfig
from cube.train.checkpoint import load_checkpoint, load_train_state, publish, save_epoch
from cube.train.loop import EpochEnd, build_model, fit
from cube.train.optim import lattice_kernel, peak_lr, use_cuda_graphs
from cube.train.step import DivergenceError
from jobs.common import ensure_ray, require_resources, setup_logging, trim_heap, user_error_in
from jobs.stages import split_rows

log = logging.getLogger("cube.train")


# ---------------------------------------------------------------- per-worker loop (runs in Ray)


def quiet_worker() -> None:
    setup_logging()
    # Ray Train logs every report's full metrics dict from every rank at INFO on a logger named
    # after its file path; keep the workers to our own one line per epoch.
    logging.getLogger().setLevel(logging.WARNING)
    for ours in ("jobs", "cube"):
        logging.getLogger(ours).setLevel(logging.INFO)


class ShardEpochs:
    """A function from the epoch to this worker's batches of its Ray Data shard: a fresh file
    order every epoch (the dataset's FileShuffleConfig), rows mixed in a local shuffle buffer
    seeded by (seed, epoch), `steps` full batches as (q, a) tensors. The rest of the epoch's
    stream is drained, so that the next epoch starts clean, and counted: `seen[epoch]` is
    (rows streamed, the sum of their question vectors), which the worker reports, so that the
    shards can be checked to cover every row once.

    Ray Data hands over `read_batches` training batches at a time, already shuffled, which are
    then cut into training batches: its cost per batch (Arrow to torch, the shuffle buffer) is
    paid once per chunk, not once per step of a small cube."""

    def __init__(self, shard: Any, batch_size: int, steps: int, seed: int, buffer: int, read_batches: int = 64) -> None:
        self.shard, self.batch_size, self.steps, self.seed, self.buffer = shard, batch_size, steps, seed, buffer
        self.read_batches = read_batches
        self.seen: dict[int, tuple[int, float]] = {}

    def __call__(self, epoch: int):
        rows, total, taken, size = 0, 0.0, 0, self.batch_size
        chunks = self.shard.iter_torch_batches(
            batch_size=size * self.read_batches, drop_last=False, dtypes=torch.float32,
            local_shuffle_buffer_size=max(self.buffer, size * self.read_batches) if self.buffer else None,
            local_shuffle_seed=self.seed * 100_003 + epoch if self.buffer else None)
        for chunk in chunks:
            q, a = chunk["q_vec"], chunk["a_vec"]
            rows += len(q)
            total = total + q.double().sum()  # a device tensor: no sync per batch
            for start in range(0, len(q) - size + 1, size):  # full batches only; a chunk's tail ends the epoch
                if taken == self.steps:
                    break
                taken += 1
                yield q[start : start + size], a[start : start + size]
        self.seen[epoch] = (rows, float(total))


def share_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (one process: the value itself)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its shard of the training split streams in through Ray Data; rank 0
    also holds the validation sample and the training probe, scores them after every epoch
    and shares the numbers, so every rank stops on the same ones."""
    import ray.train
    import ray.train.torch

    quiet_worker()
    cfg = from_dict(TrainConfig, config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the lattice runs one shape: let cuDNN time its kernels once
        if cfg.optim.tf32 != "torch":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.optim.tf32 == "on"
    model = build_model(cfg.cube, torch.tensor(config["q_mean"]), torch.tensor(config["a_mean"]), device, cfg.seed)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_checkpoint(d)[0].state_dict())
            state = load_train_state(d)
        log.info("rank %d resumed after epoch %d", rank, state[1]["progress"]["epoch"])
    val = probe = None
    if rank == 0:
        split = SplitData(config["split_root"])
        val = split.held_out("val", questions=cfg.val_questions, seed=cfg.data.seed)
        probe = split.probe(val, questions=cfg.val_questions, seed=cfg.data.seed)
        trim_heap()  # the rows read to draw them are freed: give them back before training
        step = "eager"
        if use_cuda_graphs(cfg.optim, device, world):
            step = "CUDA graphs + torch.compile" if cfg.optim.compile else "CUDA graphs"
        log.info("batch %d per worker × %d workers, %d steps an epoch, peak lr %.2g (scaled to the global batch, "
                 "capped at %.2g); step: %s, lattice kernel %s", cfg.optim.batch_size, world,
                 config["steps_per_epoch"], peak_lr(cfg.optim, world), max(cfg.optim.max_lr, cfg.optim.lr), step,
                 lattice_kernel(cfg.optim, cfg.cube, device))

    def report(end: EpochEnd) -> None:
        rows, checksum = batches.seen.get(end.metrics["epoch"] - 1, (0, 0.0))
        m = {**end.metrics, "shard_rows": rows, "shard_checksum": checksum}  # this rank's own
        if rank != 0:
            ray.train.report(m)  # every rank reports the same number of times
            return
        log.info(
            "epoch %d/%d  loss %.3f  val_mrr %.3f  val_r@1 %.3f  grad %.2f  %.0f samples/s",
            m["epoch"],
            cfg.optim.epochs,
            m["loss_total"],
            m["val_mrr"],
            m["val_recall_at_1"],
            m["grad_norm"],
            m["samples_per_s"],
        )
        with tempfile.TemporaryDirectory() as d:
            save_epoch(d, end, config["teacher"], cfg.data.seed)
            ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d))

    shard = ray.train.get_dataset_shard("train")
    batches = ShardEpochs(shard, cfg.optim.batch_size, config["steps_per_epoch"], cfg.seed, config["shuffle_buffer"])
    fit(model, batches, val, cfg.loss, cfg.optim, seed=cfg.seed, rank=rank, probe=probe, on_epoch=report,
        state=state, world_size=world, wrap=ray.train.torch.prepare_model, steps_per_epoch=config["steps_per_epoch"],
        share=share_from_rank0)


# ---------------------------------------------------------------- driver


def prepare_run(run: RunDir, storage: Storage, cfg: TrainConfig, data: str) -> None:
    """Validate + split + embed the data into the split dataset, and write the run folder's inputs.

    Raises:
        DataError: bad rows, before anything is trained.
    """
    from jobs.dataset import prepare_split

    run.path.mkdir(parents=True, exist_ok=True)
    split_root = storage.uri("split")
    prepared = prepare_split(str(data), cfg, split_root)
    save_config(cfg, run.path / "config.yaml")
    write_json(run.path / "teacher.json", {**to_dict(cfg.teacher), "dim": int(prepared.dim)})
    run.write_split_info(split_root, prepared.rows, prepared.moments)
    trim_heap()


def worker_resources(cfg: TrainConfig | DecoderJobConfig) -> dict[str, float]:
    """What one Ray Train worker reserves (Ray Train's defaults, made explicit for the check)."""
    return {"CPU": 1.0, "GPU": 1.0 if cfg.use_gpu else 0.0}


SHUFFLE_BUFFER = 10_000  # rows each worker mixes locally, beside the per-epoch file order
INGEST_OBJECT_STORE = 128 * 2**20  # bytes of the training split's blocks in flight at once


def loop_config(run: RunDir, cfg: TrainConfig) -> dict[str, Any]:
    """What every worker gets through train_loop_config: settings and where the data is, never
    the data (the training shard streams in through Ray Data; rank 0 reads the validation
    sample itself). A test keeps its pickled size under 1 MB whatever the data's size."""
    info = run.split_info()
    per_worker = info["rows"]["train"] // cfg.workers
    if per_worker < cfg.optim.batch_size:
        raise DataError(f"the training split has {info['rows']['train']} pairs: fewer than workers ({cfg.workers}) × "
                        f"optim.batch_size ({cfg.optim.batch_size}); lower one of them")
    teacher, _ = run.teacher()
    split = run.split()
    root = split.root if "://" in split.root else str(Path(split.root).resolve())
    return {"cfg": to_dict(cfg), "teacher": teacher.identity(), "split_root": root,
            "q_mean": info["q_mean"], "a_mean": info["a_mean"], "steps_per_epoch": per_worker // cfg.optim.batch_size,
            "shuffle_buffer": min(SHUFFLE_BUFFER, per_worker)}


def trainer_for(run: RunDir, cfg: TrainConfig, storage: str, callbacks: list | None = None):
    """The TorchTrainer for a prepared run folder. `storage` is Ray Train's storage path (the
    run's `ray/`, or `URI/ray`): every worker writes its checkpoints there, whatever its node.
    The training split is a Ray Data dataset, split between the workers (streaming_split)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config = loop_config(run, cfg)
    train = split_rows(config["split_root"], "train", ["q_vec", "a_vec"], cfg.seed, cfg.pipeline)
    # The ingest's blocks in flight, bounded: a few batches' worth for each worker, not a share of
    # the node's object store (what Ray Data would take by default).
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.resource_limits = ingest.resource_limits.copy(object_store_memory=INGEST_OBJECT_STORE)
    return TorchTrainer(
        train_worker, train_loop_config=config, datasets={"train": train},
        dataset_config=ray.train.DataConfig(execution_options=ingest),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=worker_resources(cfg),
                                               placement_strategy=cfg.placement),
        run_config=ray.train.RunConfig(
            name="train", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_mrr",
                                                         checkpoint_score_order="max"),
            callbacks=callbacks or [],
        ),
    )


class EpochBar:
    """An epoch progress bar with the running validation metric, fed by the metrics.csv that the
    Train controller writes (the driver itself only waits in `trainer.fit()`)."""

    def __init__(self, metrics_csv: Path, epochs: int, metric: str = "val_mrr", label: str = "val MRR",
                 desc: str = "train") -> None:
        self.path, self.epochs, self.metric, self.label, self.desc = metrics_csv, epochs, metric, label, desc
        self.stop = threading.Event()

    def __enter__(self) -> EpochBar:
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _read(self) -> list[dict[str, str]]:
        try:
            with self.path.open(newline="") as f:
                return list(csv.DictReader(f))
        except (FileNotFoundError, csv.Error):
            return []

    def _follow(self) -> None:
        seen = len(self._read())
        bar = tqdm(total=self.epochs, initial=seen, desc=self.desc, unit="epoch")
        while True:
            stopping = self.stop.wait(0.5)
            rows = self._read()
            if len(rows) != seen:  # redraw once per epoch: a log file gets one update per epoch
                seen = bar.n = len(rows)
                bar.set_postfix_str(f"{self.label} {float(rows[-1][self.metric]):.3f}", refresh=True)
            if stopping:
                break
        bar.close()


def fit_run(run: RunDir, cfg: TrainConfig, storage: str) -> None:
    """Run (or resume) training, then publish the best and last checkpoints into the run folder."""
    from jobs.metrics_log import MetricsLog

    check_resources(cfg)
    with EpochBar(run.path / "metrics.csv", cfg.optim.epochs):
        try:
            result = trainer_for(run, cfg, storage, callbacks=[MetricsLog(str(run.path))]).fit()
        except Exception as e:  # a diverged run is the user's to fix: say so in one line, not a Ray traceback
            cause = user_error_in(e, DivergenceError)
            if cause is None:
                raise
            raise cause from e
    best = result.get_best_checkpoint(metric="val_mrr", mode="max")
    for src, dst in ((best, "model"), (result.checkpoint, "last")):
        with src.as_directory() as d:
            publish(d, run.path / dst)
    log.info("best checkpoint (val MRR %.3f) → %s", load_checkpoint(run.path / "model")[1]["val"]["mrr"], run.model_dir)


def check_resources(cfg: TrainConfig) -> None:
    """The workers, and one CPU beside them for Ray Data, which lists and reads the split's files
    for them: refused before any work starts when the cluster cannot hold them."""
    require_resources([worker_resources(cfg)] * cfg.workers + [{"CPU": 1.0}],
                      f"training with {cfg.workers} workers (and Ray Data's reader)", cfg.wait_for_resources_s)


def write_bank(run: RunDir, storage: Storage) -> None:
    """The served answers as an artefact of the run (RUN/bank): every distinct answer of the
    split with its vector, streamed from the split dataset."""
    cfg = run.config(TrainConfig)
    target = storage.uri("bank")
    rows = write_bank_from_split(run.split(), target, cfg.bank_dtype)
    run.write_bank_info(target, rows, cfg.bank_dtype)
    log.info("answer bank: %s distinct answers → %s", f"{rows:,}", target)
    if cfg.bank_index.kind != "exact":
        model, _ = load_checkpoint(run.model_dir)  # the index's keys are centred by the model's answer mean
        size = AnswerBank.read(target, model.a_mean).write_index(target, cfg.bank_index, seed=cfg.seed)
        log.info("%s index of the bank: %.1f MB → %s", cfg.bank_index.kind, size / 1e6, target)
        trim_heap()


def train(data_path: str | Path | None, target: str | Path, cfg: TrainConfig | None, resume: bool = False) -> dict:
    """Train into `target` (fresh) or continue it (`resume`); returns the held-out report.

    `target` is a folder or a storage URI (cube/data/storage.py): with a URI the run is staged in a
    local folder and copied to the URI at the end, also when training fails, so that `--resume
    URI` from any machine finds its config, split and metrics.

    Raises:
        RunError: `resume` on a folder that is not a run, or a fresh run into an existing one.
    """
    from cube.data.rundir import RunError
    from cube.eval.plots import plot_curves

    store = Storage.of(target)
    run = RunDir(store.local)
    if resume:
        store.pull()
        run.require("config.yaml", "split.json", "teacher.json")
        if (run.path / "eval.json").is_file():
            log.info("%s is already finished; nothing to retrain (delete it to train again)", store)
            return json.loads((run.path / "eval.json").read_text())  # its report, as written: not fit again
        cfg = run.config(TrainConfig)
    else:
        assert cfg is not None and data_path is not None
        if store.exists("config.yaml"):
            raise RunError(f"{store} already holds a run; pass --resume {store} to continue it, "
                           "or choose another --output")
        Source.of(data_path)  # a missing or unreadable input is named before the cluster is asked for anything
        store.reset()
        ensure_ray()
        check_resources(cfg)  # before the data is read, embedded and split
        try:
            prepare_run(run, store, cfg, str(data_path))
        except BaseException:
            store.discard()  # nothing is left behind by a run that never started
            raise
        store.push()  # the inputs first: a run killed before its end can still be resumed from the URI
    try:
        ensure_ray()
        fit_run(run, cfg, store.ray_storage())
        report = evaluate_run(run.path)
        trim_heap()  # the evaluation's pool and baselines are freed before the bank is built
        write_json(run.path / "eval.json", report)
        write_bank(run, store)
        plot_curves(run.path / "metrics.csv", run.path / "curves.png")
    finally:
        store.push()
    return report
