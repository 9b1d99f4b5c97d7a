"""Ray Train around the answer writer (cube/decoder): a trained run in, RUN/decoder/ out.

    RUN/decoder/config.yaml      the job's config (DecoderJobConfig)
    RUN/decoder/metrics.csv      one row per epoch: train and validation loss (token cross-entropy)
    RUN/decoder/model/           the best epoch by validation loss (or the last: `keep`): cube.decoder.load_decoder
    RUN/decoder/last/            the last epoch, with the optimiser's state
    RUN/decoder/ray/             Ray Train's own checkpoints: what `--resume` continues from

Each worker streams its shard of the training split's (answer, a_vec) through Ray Data and
learns to write each answer from that answer's own embedding (a reconstruction: no cube is
needed). DDP wraps the decoder; a frozen LM's weights get no gradient, so only the projector's
are synced. Rank 0 measures the loss on a fixed
set of validation answers after every epoch. Everything a worker runs lives here, in an
importable module (`cube decoder` is jobs/decoder.py).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from cube.config import from_dict, save_config, to_dict
from cube.data.qa import DataError
from cube.data.rundir import RunDir
from cube.data.split import SplitData, vectors
from cube.decoder.model import WEIGHTS, EmbeddingDecoder, build_decoder
from cube.job_config import DecoderJobConfig
from cube.teachers.base import TeacherError, resolve_source
from cube.train.checkpoint import publish
from jobs.common import ensure_ray, require_resources
from jobs.stages import split_rows
from jobs.trainer import EpochBar, quiet_worker, worker_resources

log = logging.getLogger("cube.decoder")
STATE = "train_state.pt"  # beside decoder.pt in a checkpoint: optimiser, scheduler, epoch
PROGRESS_S = 30.0  # seconds between rank 0's progress lines within an epoch


def schedule(opt: torch.optim.Optimizer, cfg: DecoderJobConfig, total_steps: int) -> LRScheduler:
    """Linear warm-up from 1e-3 of the rate, then cosine decay to zero over the run. (Not the
    cube's `with_warmup`, which starts at 1/warmup: the suite's held-out check of generated text
    failed in a fresh clone with it; this is the schedule that check was measured with.)"""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if not warmup:
        return CosineAnnealingLR(opt, max(total_steps, 1))
    return SequentialLR(opt, [LinearLR(opt, 1e-3, 1.0, warmup), CosineAnnealingLR(opt, max(total_steps - warmup, 1))],
                        milestones=[warmup])


def save_checkpoint(folder: str | Path, decoder: EmbeddingDecoder, opt: torch.optim.Optimizer,
                    sched: Any, epoch: int, metrics: dict[str, float]) -> None:
    """A loadable decoder (decoder.pt + decoder.json) plus what resuming needs."""
    decoder.save(folder)
    torch.save({"optim": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch, "metrics": metrics},
               Path(folder) / STATE)


@torch.no_grad()
def validation_loss(decoder: EmbeddingDecoder, texts: list[str], z: torch.Tensor, batch_size: int) -> float:
    decoder.eval()
    total = 0.0
    for start in range(0, len(texts), batch_size):
        part = texts[start : start + batch_size]
        total += float(decoder.loss(z[start : start + batch_size], part)) * len(part)
    decoder.train(decoder.cfg.train_lm)
    return total / max(len(texts), 1)


def decoder_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: `steps_per_epoch` batches of its shard every epoch (every rank the
    same number, as DDP needs), one checkpoint per epoch from rank 0."""
    import ray.train
    import ray.train.torch

    quiet_worker()
    cfg = from_dict(DecoderJobConfig, config["cfg"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    decoder = build_decoder(cfg.decoder, config["dim"], torch.tensor(config["a_mean"]), str(device), cfg.seed)
    params = [p for p in decoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = config["steps_per_epoch"]
    sched = schedule(opt, cfg, cfg.epochs * steps)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            decoder.load_weights(torch.load(Path(d) / WEIGHTS, map_location=device, weights_only=True), d)
            state = torch.load(Path(d) / STATE, map_location=device, weights_only=False)
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start = int(state["epoch"])
        log.info("rank %d resumed after epoch %d", rank, start)
    # DDP over the decoder; its forward is the loss. A frozen LM's weights get no gradient, so DDP
    # syncs only what learns (after one broadcast of every weight at the start).
    step_model = ray.train.torch.prepare_model(decoder, move_to_device=False)
    val_texts: list[str] = []
    val_z = torch.zeros(0)
    if rank == 0:
        table = SplitData(config["split_root"]).table("val", ["answer", "a_vec"], limit=cfg.val_answers)
        val_texts, val_z = table.column("answer").to_pylist(), torch.from_numpy(vectors(table.column("a_vec")))
        log.info("decoder: LM %s (%s), %d soft-prompt tokens, %d trainable parameters; batch %d × %d workers, "
                 "%d steps an epoch", cfg.decoder.lm, "trained" if cfg.decoder.train_lm else "frozen",
                 cfg.decoder.prompt_tokens, sum(p.numel() for p in params), cfg.batch_size, world, steps)
    shard = ray.train.get_dataset_shard("train")
    decoder.train(cfg.decoder.train_lm)
    for epoch in range(start, cfg.epochs):
        t0, total, taken = time.perf_counter(), 0.0, 0
        shown = t0
        batches = shard.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow", drop_last=True,
                                     local_shuffle_buffer_size=config["shuffle_buffer"],
                                     local_shuffle_seed=cfg.seed * 100_003 + epoch)
        for batch in batches:  # drained to its end, so the next epoch's stream starts clean
            if taken == steps:
                continue
            z = torch.from_numpy(vectors(batch.column("a_vec")))
            loss = step_model(z, batch.column("answer").to_pylist())
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"decoder loss is {float(loss)} at epoch {epoch + 1}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total, taken = total + float(loss), taken + 1
            if rank == 0 and time.perf_counter() - shown > PROGRESS_S:  # an epoch of a large LM takes minutes
                shown = time.perf_counter()
                log.info("epoch %d: step %d/%d  loss %.3f  %.1f s/step", epoch + 1, taken, steps, total / taken,
                         (shown - t0) / taken)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(taken, 1), "steps": taken,
                   "seconds": time.perf_counter() - t0, "lr": sched.get_last_lr()[0], "resumed_from": start}
        if rank != 0:
            ray.train.report(metrics)
            continue
        metrics["val_loss"] = validation_loss(decoder, val_texts, val_z, cfg.batch_size)
        if not math.isfinite(metrics["val_loss"]):  # never a candidate for the best checkpoint
            raise FloatingPointError(f"decoder validation loss is {metrics['val_loss']} at epoch {epoch + 1}; lower lr")
        log.info("epoch %d/%d  train loss %.3f  val loss %.3f  %.0f s", epoch + 1, cfg.epochs,
                 metrics["train_loss"], metrics["val_loss"], metrics["seconds"])
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, decoder, opt, sched, epoch + 1, metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------- driver


SHUFFLE_BUFFER = 2_048  # rows each worker mixes locally, beside the per-epoch file order


def train_decoder(run_path: str | Path, cfg: DecoderJobConfig | None, resume: bool = False) -> dict[str, Any]:
    """Train (or, with `resume`, continue) RUN/decoder; returns the best epoch's metrics.

    Raises:
        RunError: the run is not a trained run, or a fresh decoder would overwrite one.
        DataError: fewer training pairs than workers × batch_size.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from cube.data.rundir import RunError
    from jobs.metrics_log import MetricsLog

    run = RunDir(run_path)
    run.require("split.json", "teacher.json", "config.yaml")
    folder = run.path / "decoder"
    if resume:
        if not (folder / "config.yaml").is_file():
            raise RunError(f"{folder} holds no decoder run to resume; start one with `cube decoder --run {run.path}`")
        from cube.config import load_config

        cfg = load_config(DecoderJobConfig, folder / "config.yaml")
    else:
        assert cfg is not None
        if (folder / "config.yaml").is_file():
            raise RunError(f"{folder} already holds a decoder; pass --resume to continue it, or delete the folder")
    info = run.split_info()
    rows = info["rows"]["train"] if not cfg.max_answers else min(cfg.max_answers, info["rows"]["train"])
    per_worker = rows // cfg.workers
    if per_worker < cfg.batch_size:
        raise DataError(f"{rows} training pairs: fewer than workers ({cfg.workers}) × batch_size ({cfg.batch_size}); "
                        "lower one of them")
    try:  # a missing LM is named here, not in a worker's traceback
        resolve_source(cfg.decoder.lm)
    except TeacherError as e:
        raise TeacherError(f"decoder.lm: {e}".replace("teacher.name", "decoder.lm")) from None
    if not resume:  # only a decoder that can start leaves a folder behind
        folder.mkdir(parents=True, exist_ok=True)
        save_config(cfg, folder / "config.yaml")
    _, dim = run.teacher()
    split = run.split()
    root = split.root if "://" in split.root else str(Path(split.root).resolve())
    config = {"cfg": to_dict(cfg), "split_root": root, "dim": dim, "a_mean": info["a_mean"],
              "steps_per_epoch": per_worker // cfg.batch_size, "shuffle_buffer": min(SHUFFLE_BUFFER, per_worker)}
    ensure_ray()
    # the workers, and one CPU beside them for Ray Data's reader (as for the cube)
    require_resources([worker_resources(cfg)] * cfg.workers + [{"CPU": 1.0}],
                      f"decoder training with {cfg.workers} workers", 0.0)
    train = split_rows(root, "train", ["answer", "a_vec"], cfg.seed)
    if cfg.max_answers:
        train = train.limit(cfg.max_answers)
    trainer = TorchTrainer(
        decoder_worker, train_loop_config=config, datasets={"train": train},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=worker_resources(cfg)),
        run_config=ray.train.RunConfig(
            name="decoder", storage_path=str((folder / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_loss",
                                                         checkpoint_score_order="min"),
            callbacks=[MetricsLog(str(folder))]))
    with EpochBar(folder / "metrics.csv", cfg.epochs, metric="val_loss", label="val loss", desc="decoder"):
        result = trainer.fit()
    best = result.get_best_checkpoint(metric="val_loss", mode="min") if cfg.keep == "best" else result.checkpoint
    for src, dst in ((best, "model"), (result.checkpoint, "last")):
        with src.as_directory() as d:
            publish(d, folder / dst)
    best_metrics = torch.load(folder / "model" / STATE, map_location="cpu", weights_only=False)["metrics"]
    log.info("%s decoder epoch %d (val loss %.3f) → %s", cfg.keep, best_metrics["epoch"], best_metrics["val_loss"],
             folder / "model")
    return best_metrics
