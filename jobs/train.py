"""Train the cube with Ray Train: embed (cached) → TorchTrainer (DDP) → best checkpoint → held-out report.

    python -m jobs.train --data data/qa.jsonl --output runs/demo --set optim.epochs=5
    python -m jobs.train --resume runs/demo      # continue an interrupted run from its last epoch

Each worker reads its shard of the training split through Ray Data, trains with gloo (CPU) or
NCCL (GPU), and rank 0 reports a checkpoint every epoch. The run folder layout is described in
cube/rundir.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cube.checkpoint import (load_checkpoint, publish, restore_training_state, save_checkpoint, save_train_state,
                             load_train_state, training_state)
from cube.config import from_dict, load_config, save_config, to_dict
from cube.data import DataConfig, DataError, load_qa, split_pairs
from cube.losses import LossConfig
from cube.model import CellularCube, CubeConfig
from cube.baselines import Split
from cube.rundir import RunDir, vectors_to_arrow, write_json, write_split
from cube.teacher import TeacherConfig
from cube.training import OptimConfig, Progress, make_optimizer, peak_lr, score, train_epoch
from jobs.common import add_config_flags, config_from_args, ensure_ray, setup_logging
from jobs.embed import PipelineOptions, embed_pairs

log = logging.getLogger("cube.train")


@dataclass(frozen=True)
class TrainConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)  # the embedding stage
    cube: CubeConfig = field(default_factory=CubeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker, NCCL
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    seed: int = 0  # model init and shuffling (the split has its own seed: data.seed)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.optim.precision == "fp16" and not self.use_gpu:
            raise ValueError("optim.precision=fp16 needs use_gpu=true; use bf16 on CPU")


# ---------------------------------------------------------------- per-worker loop (runs in Ray)


def _whole_shard(shard) -> tuple[torch.Tensor, torch.Tensor]:
    qs, as_ = [], []
    for batch in shard.iter_torch_batches(batch_size=512):
        qs.append(batch["q"])
        as_.append(batch["a"])
    return torch.cat(qs), torch.cat(as_)


def train_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    import ray.data

    setup_logging()
    # Ray Train logs every report's full metrics dict from every rank at INFO on a logger named
    # after its file path; keep the workers to our own one line per epoch.
    logging.getLogger().setLevel(logging.WARNING)
    for ours in ("jobs", "cube"):
        logging.getLogger(ours).setLevel(logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one log line per epoch instead
    cfg = from_dict(TrainConfig, config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = CellularCube(cfg.cube, config["embed_dim"])
    model.set_centering(torch.tensor(config["q_mean"]), torch.tensor(config["a_mean"]))
    # channels-last 3D is ~15% faster for conv3d on CPU; converting the parameters too keeps
    # DDP's gradient buckets in the same layout as the gradients.
    model.to(device, memory_format=torch.channels_last_3d)
    world = ray.train.get_context().get_world_size()
    opt, sched = make_optimizer(model, cfg.optim, config["steps_per_epoch"], world_size=world)
    if rank == 0:
        log.info("batch %d per worker × %d workers, peak lr %.2g (scaled to the global batch)", cfg.optim.batch_size, world, peak_lr(cfg.optim, world))
    progress = Progress()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            restored, _ = load_checkpoint(d)
            model.load_state_dict(restored.state_dict())
            tensors, meta = load_train_state(d)
            restore_training_state(opt, sched, tensors, meta)
            progress = Progress(**meta["progress"])
        log.info("rank %d resumed after epoch %d", rank, progress.epoch)
    resumed_from = progress.epoch
    ddp = ray.train.torch.prepare_model(model)
    scaler = torch.amp.GradScaler("cuda") if cfg.optim.precision == "fp16" else None
    val_q, val_a = _whole_shard(ray.train.get_dataset_shard("val"))
    probe_q, probe_a = _whole_shard(ray.train.get_dataset_shard("train_probe"))
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(progress.epoch, cfg.optim.epochs):
        batches = ((b["q"], b["a"]) for b in train_shard.iter_torch_batches(
            batch_size=cfg.optim.batch_size, drop_last=True, local_shuffle_buffer_size=2048,
            local_shuffle_seed=cfg.seed * 1000 + epoch))
        stats = train_epoch(ddp, batches, opt, sched, cfg.loss, cfg.optim, scaler)
        val = score(model, val_q, val_a, torch.arange(len(val_a)))
        seen = score(model, probe_q, probe_a, torch.arange(len(probe_a)))
        improved = progress.update(val["mrr"])
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
        metrics = {"epoch": epoch + 1, **{k.replace("/", "_"): v for k, v in stats.items()},
                   **{f"train_{k.replace('@', '_at_')}": v for k, v in seen.items()},
                   **{f"val_{k.replace('@', '_at_')}": v for k, v in val.items()}, "peak_memory_mb": peak / 2**20,
                   "improved": improved, "resumed_from": resumed_from}
        if rank == 0:
            log.info("epoch %d/%d  loss %.3f  val_mrr %.3f  val_r@1 %.3f  grad %.2f  %.0f samples/s",
                     epoch + 1, cfg.optim.epochs, stats["loss/total"], val["mrr"], val["recall@1"],
                     stats["grad_norm"], stats["samples_per_s"])
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, config["teacher"], {"split_seed": cfg.data.seed, "epoch": epoch + 1, "val": val})
                save_train_state(d, *training_state(opt, sched, {"progress": asdict(progress)}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        if progress.should_stop(cfg.optim.patience):
            if rank == 0:
                log.info("early stop: val MRR did not improve for %d epochs", cfg.optim.patience)
            break  # every rank sees the same val MRR, so all stop together


def _peak_rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


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


def _dataset(split: Split):
    import pyarrow as pa
    import ray.data

    return ray.data.from_arrow(pa.table({"q": vectors_to_arrow(split.q.numpy()), "a": vectors_to_arrow(split.a.numpy())}))


def fit(run: RunDir, cfg: TrainConfig) -> None:
    """Run (or resume) the TorchTrainer whose storage lives in RUN_DIR/ray."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.metrics_log import MetricsLog

    data = run.data()
    train, val = data.split("train"), data.split("val")
    per_worker = len(train.q) // cfg.workers
    if per_worker < cfg.optim.batch_size:
        raise DataError(f"the training split has {len(train.q)} pairs: fewer than workers ({cfg.workers}) × "
                        f"optim.batch_size ({cfg.optim.batch_size}); lower one of them")
    teacher, dim = run.teacher()
    config = {
        "cfg": to_dict(cfg), "embed_dim": dim, "teacher": teacher.identity(),
        "q_mean": train.q.mean(0).tolist(), "a_mean": train.a.mean(0).tolist(),
        "steps_per_epoch": per_worker // cfg.optim.batch_size,
    }
    # No random_shuffle: its tasks would need CPUs that the training workers hold (deadlock on
    # a small machine). Workers shuffle locally with a seeded buffer instead.
    # Train metrics are scored like val, on a fixed slice of the training split of the same
    # size, so train-vs-val gaps are not an artefact of pool size.
    probe = Split(train.q[: len(val.q)], train.a[: len(val.q)])
    datasets = {"train": _dataset(train), "val": _dataset(val), "train_probe": _dataset(probe)}
    trainer = TorchTrainer(
        train_worker, train_loop_config=config, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name="train", storage_path=str((run.path / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="val_mrr",
                                                         checkpoint_score_order="max"),
            callbacks=[MetricsLog(str(run.path))],
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_mrr", mode="max")
    for src, dst in ((best, "model"), (result.checkpoint, "last")):
        with src.as_directory() as d:
            publish(d, run.path / dst)
    log.info("best checkpoint (val MRR %.3f) → %s", load_checkpoint(run.path / "model")[1]["val"]["mrr"], run.model_dir)


def train(data_path: Path | None, run_path: Path, cfg: TrainConfig | None, resume: bool = False) -> dict:
    """Train into `run_path` (fresh) or continue it (`resume`); returns the held-out report."""
    from jobs.eval import evaluate_run

    run = RunDir(run_path)
    if resume:
        run.require("config.yaml", "split.parquet", "teacher.json")
        if (run.path / "eval.json").is_file():
            log.info("%s is already finished; nothing to retrain (delete it to train again)", run.path)
            return evaluate_run(run.path)
        cfg = load_config(TrainConfig, run.path / "config.yaml")
    else:
        assert cfg is not None and data_path is not None
        if (run.path / "config.yaml").exists():
            raise SystemExit(f"{run.path} already holds a run; pass --resume {run.path} to continue it, "
                             "or choose another --output")
        prepare_run(run, cfg, data_path)
    ensure_ray()
    fit(run, cfg)
    report = evaluate_run(run.path)
    write_json(run.path / "eval.json", report)
    from cube.plots import plot_curves

    plot_curves(run.path / "metrics.csv", run.path / "curves.png")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cube train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="Q&A file: JSONL, CSV or Parquet with question/answer columns")
    p.add_argument("--output", type=Path, help="run folder to create (must be empty or absent)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.resume:
        if args.data or args.output or args.config or args.overrides:
            parser.error("--resume takes only the run folder: its config and data are already in it")
        report = train(None, args.resume, None, resume=True)
    else:
        if not (args.data and args.output):
            parser.error("--data and --output are required (or --resume RUN_DIR)")
        cfg = config_from_args(TrainConfig, args)
        try:
            report = train(args.data, args.output, cfg)
        except DataError as e:
            raise SystemExit(f"data error: {e}") from None
    from cube.evaluate import format_report

    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
