"""Ray Train around the cube's one training loop: a run folder in, a trained run folder out.

    prepare_run: validate + split + embed (cached) the data, write the run folder's inputs
    fit_run:     a TorchTrainer (DDP: gloo on CPU, NCCL on GPU) whose workers each train on a
                 shard of the split with cube.train.loop.fit
    train:       both, then the held-out comparison (eval.json) and the curves

Everything a Ray worker runs lives in this importable module, never in an entrypoint that may
be `__main__` (Ray would pickle it by value). `cube train` (jobs/train.py) is the command line.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from cube.config import from_dict, load_config, save_config, to_dict
from cube.data.qa import DataError, load_qa, split_pairs
from cube.data.rundir import RunDir, write_json, write_split
from cube.data.storage import Storage
from cube.eval.metrics import Split
from cube.eval.report import evaluate_run
from cube.job_config import TrainConfig
from cube.train.checkpoint import load_checkpoint, load_train_state, publish, save_epoch
from cube.train.loop import EpochEnd, build_model, fit
from cube.train.optim import lattice_kernel, peak_lr, use_cuda_graphs
from jobs.common import ensure_ray, require_resources, setup_logging
from jobs.embedding import embed_pairs

log = logging.getLogger("cube.train")


# ---------------------------------------------------------------- per-worker loop (runs in Ray)


def shard(train: Split, rank: int, world: int) -> Split:
    """This rank's share of the training split: every world-th pair, so shards differ by at most one.

    The split travels whole in the trainer's config (a few thousand rows, tens of MB at most)
    and is sharded here: simpler and faster than a Ray Data pipeline for data this size, and
    it keeps Ray Data's per-execution output out of training."""
    return Split(train.q[rank::world], train.a[rank::world])


def _quiet_worker() -> None:
    setup_logging()
    # Ray Train logs every report's full metrics dict from every rank at INFO on a logger named
    # after its file path; keep the workers to our own one line per epoch.
    logging.getLogger().setLevel(logging.WARNING)
    for ours in ("jobs", "cube"):
        logging.getLogger(ours).setLevel(logging.INFO)


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_worker()
    cfg = from_dict(TrainConfig, config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the lattice runs one shape: let cuDNN time its kernels once
    model = build_model(cfg.cube, torch.tensor(config["q_mean"]), torch.tensor(config["a_mean"]), device, cfg.seed)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_checkpoint(d)[0].state_dict())
            state = load_train_state(d)
        log.info("rank %d resumed after epoch %d", rank, state[1]["progress"]["epoch"])
    if rank == 0:
        step = "eager"
        if use_cuda_graphs(cfg.optim, device, world):
            step = "CUDA graphs + torch.compile" if cfg.optim.compile else "CUDA graphs"
        log.info(
            "batch %d per worker × %d workers, peak lr %.2g (scaled to the global batch); step: %s, lattice kernel %s",
            cfg.optim.batch_size,
            world,
            peak_lr(cfg.optim, world),
            step,
            lattice_kernel(cfg.optim, cfg.cube, device),
        )

    def report(end: EpochEnd) -> None:
        m = end.metrics
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

    fit(model, shard(config["train"], rank, world), config["val"], cfg.loss, cfg.optim,
        seed=cfg.seed, rank=rank, probe=config["probe"], on_epoch=report, state=state, world_size=world,
        wrap=ray.train.torch.prepare_model, steps_per_epoch=config["steps_per_epoch"])


# ---------------------------------------------------------------- driver


def prepare_run(run: RunDir, cfg: TrainConfig, data_path: Path) -> None:
    """Validate + split + embed the data and write the run folder's inputs.

    Raises:
        DataError: bad rows, before anything is written.
    """
    df = split_pairs(load_qa(data_path, cfg.data), cfg.data)
    q, a = embed_pairs(df, cfg.teacher, cfg.pipeline)
    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.path / "config.yaml")
    write_json(run.path / "teacher.json", {**to_dict(cfg.teacher), "dim": int(q.shape[1])})
    write_split(run.path / "split.parquet", df, q, a)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker reserves (Ray Train's defaults, made explicit for the check)."""
    return {"CPU": 1.0, "GPU": 1.0 if cfg.use_gpu else 0.0}


def trainer_for(run: RunDir, cfg: TrainConfig, storage: str, callbacks: list | None = None):
    """The TorchTrainer for a prepared run folder. `storage` is Ray Train's storage path (the
    run's `ray/`, or `URI/ray`): every worker writes its checkpoints there, whatever its node."""
    import ray.train
    from ray.train.torch import TorchTrainer

    data = run.data()
    train = data.split("train")
    per_worker = len(train.q) // cfg.workers
    if per_worker < cfg.optim.batch_size:
        raise DataError(f"the training split has {len(train.q)} pairs: fewer than workers ({cfg.workers}) × "
                        f"optim.batch_size ({cfg.optim.batch_size}); lower one of them")
    teacher, dim = run.teacher()
    config = {
        "cfg": to_dict(cfg), "teacher": teacher.identity(), "train": train, "val": data.held_out("val"),
        "probe": data.probe(), "q_mean": train.q.mean(0).tolist(), "a_mean": train.a.mean(0).tolist(),
        "steps_per_epoch": per_worker // cfg.optim.batch_size,
    }
    return TorchTrainer(
        train_worker, train_loop_config=config,
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
    """An epoch progress bar with the running validation MRR, fed by the metrics.csv that the
    Train controller writes (the driver itself only waits in `trainer.fit()`)."""

    def __init__(self, metrics_csv: Path, epochs: int) -> None:
        self.path, self.epochs = metrics_csv, epochs
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
        bar = tqdm(total=self.epochs, initial=seen, desc="train", unit="epoch")
        while True:
            stopping = self.stop.wait(0.5)
            rows = self._read()
            if len(rows) != seen:  # redraw once per epoch: a log file gets one update per epoch
                seen = bar.n = len(rows)
                bar.set_postfix_str(f"val MRR {float(rows[-1]['val_mrr']):.3f}", refresh=True)
            if stopping:
                break
        bar.close()


def fit_run(run: RunDir, cfg: TrainConfig, storage: str) -> None:
    """Run (or resume) training, then publish the best and last checkpoints into the run folder."""
    from jobs.metrics_log import MetricsLog

    require_resources([worker_resources(cfg)] * cfg.workers, f"training with {cfg.workers} workers",
                      cfg.wait_for_resources_s)
    with EpochBar(run.path / "metrics.csv", cfg.optim.epochs):
        result = trainer_for(run, cfg, storage, callbacks=[MetricsLog(str(run.path))]).fit()
    best = result.get_best_checkpoint(metric="val_mrr", mode="max")
    for src, dst in ((best, "model"), (result.checkpoint, "last")):
        with src.as_directory() as d:
            publish(d, run.path / dst)
    log.info("best checkpoint (val MRR %.3f) → %s", load_checkpoint(run.path / "model")[1]["val"]["mrr"], run.model_dir)


def train(data_path: Path | None, target: str | Path, cfg: TrainConfig | None, resume: bool = False) -> dict:
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
        run.require("config.yaml", "split.parquet", "teacher.json")
        if (run.path / "eval.json").is_file():
            log.info("%s is already finished; nothing to retrain (delete it to train again)", store)
            return evaluate_run(run.path)
        cfg = load_config(TrainConfig, run.path / "config.yaml")
    else:
        assert cfg is not None and data_path is not None
        if store.exists("config.yaml"):
            raise RunError(f"{store} already holds a run; pass --resume {store} to continue it, "
                           "or choose another --output")
        store.reset()
        prepare_run(run, cfg, data_path)
        store.push()  # the inputs first: a run killed before its end can still be resumed from the URI
    try:
        ensure_ray()
        fit_run(run, cfg, store.ray_storage())
        report = evaluate_run(run.path)
        write_json(run.path / "eval.json", report)
        plot_curves(run.path / "metrics.csv", run.path / "curves.png")
    finally:
        store.push()
    return report
