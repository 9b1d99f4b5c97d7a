"""The one training loop, `fit`, in plain PyTorch.

Ray Train workers, Tune trials, benchmarks and tests all call it, each with its own
per-epoch callback (report to Ray, checkpoint, collect numbers).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from cube.eval.inference import score_held_out
from cube.eval.metrics import HeldOut, Split
from cube.model import CellularCube, CubeConfig
from cube.train.graph_step import GraphedCubeStep
from cube.train.losses import LossConfig, cube_loss
from cube.train.optim import (
    OptimConfig,
    autocast,
    lattice_kernel,
    make_optimizer,
    restore_training_state,
    training_state,
    use_cuda_graphs,
)


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a restart resumes it exactly."""

    epoch: int = 0  # epochs completed
    best_val_mrr: float = -1.0
    bad_epochs: int = 0  # consecutive epochs without a better val MRR

    def update(self, val_mrr: float) -> bool:
        """Record a finished epoch; True if it set a new best."""
        improved = val_mrr > self.best_val_mrr
        self.epoch += 1
        self.best_val_mrr = max(self.best_val_mrr, val_mrr)
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return improved

    def should_stop(self, patience: int) -> bool:
        return patience > 0 and self.bad_epochs >= patience


def unwrap(model: nn.Module) -> CellularCube:
    """The CellularCube inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def train_epoch(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, loss_cfg: LossConfig, optim_cfg: OptimConfig,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Train on `batches` of raw (question, answer) embeddings; return mean loss terms,
    mean gradient norm and samples/s. Syncs with the device once, at the end."""
    core = unwrap(model)
    device = core.q_mean.device
    model.train()
    sums: dict[str, torch.Tensor] = {}
    n_batches, n_samples, start = 0, 0, time.perf_counter()
    for q, a in batches:
        q, a = q.to(device, non_blocking=True), a.to(device, non_blocking=True)
        q_c, a_c = q - core.q_mean, a - core.a_mean
        with autocast(optim_cfg.precision, device):
            out = model(q_c)
            with torch.no_grad():
                target_face = core.encode_face(a_c)
            terms = cube_loss(out, a_c, target_face, loss_cfg)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(terms["total"]).backward()
            scaler.unscale_(opt)
        else:
            terms["total"].backward()
        clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        for k, v in {**terms, "grad_norm": grad_norm}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_batches += 1
        n_samples += q.shape[0]
    if n_batches == 0:
        raise RuntimeError("this worker received no training batches; use fewer workers or a smaller batch_size")
    elapsed = time.perf_counter() - start
    out = {f"loss/{k}" if k != "grad_norm" else k: (v / n_batches).item() for k, v in sums.items()}
    out["samples_per_s"] = n_samples / elapsed
    out["lr"] = sched.get_last_lr()[0]
    return out


def build_model(cfg: CubeConfig, q_mean: torch.Tensor, a_mean: torch.Tensor, device: torch.device | str = "cpu",
                seed: int = 0) -> CellularCube:
    """A fresh cube, centred with the training split's means, channels-last on `device`.

    channels-last 3D is ~15% faster for conv3d on CPU; converting the parameters too keeps
    DDP's gradient buckets in the same layout as the gradients."""
    torch.manual_seed(seed)
    model = CellularCube(cfg, q_mean.shape[-1])
    model.set_centering(q_mean, a_mean)
    return model.to(device, memory_format=torch.channels_last_3d)


def epoch_batches(
    train: Split, batch_size: int, steps: int, seed: int, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` shuffled full batches; the order depends only on (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(train.q), generator=gen)[: steps * batch_size].to(train.q.device)
    for idx in order.split(batch_size):
        yield train.q[idx], train.a[idx]


@dataclass
class EpochEnd:
    """What `fit` hands its callback after each epoch: numbers to report, state to checkpoint."""

    metrics: dict[str, Any]
    val: dict[str, float]  # this epoch's validation metrics, unflattened (cos, recall@1, recall@5, mrr)
    model: CellularCube
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    progress: Progress

    def train_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return training_state(self.opt, self.sched, {"progress": asdict(self.progress)})


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _flat(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k.replace('@', '_at_')}": v for k, v in metrics.items()}


RunEpoch = Callable[[Iterator[tuple[torch.Tensor, torch.Tensor]]], dict[str, float]]


StepParts = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, RunEpoch]


def _eager_step(
    model: CellularCube, loss_cfg: LossConfig, optim_cfg: OptimConfig, steps: int, world_size: int,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None, wrap: Callable[[nn.Module], nn.Module] | None,
) -> StepParts:
    """train_epoch through `wrap(model)` (DDP under Ray Train), with its optimiser and schedule."""
    opt, sched = make_optimizer(model, optim_cfg, steps, world_size)
    if state is not None:
        restore_training_state(opt, sched, *state)
    net = wrap(model) if wrap is not None else model
    scaler = torch.amp.GradScaler("cuda") if optim_cfg.precision == "fp16" else None

    def run_epoch(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        return train_epoch(net, batches, opt, sched, loss_cfg, optim_cfg, scaler)
    return opt, sched, run_epoch


def _graphed_step(
    model: CellularCube, loss_cfg: LossConfig, optim_cfg: OptimConfig, steps: int, world_size: int,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None,
) -> StepParts:
    """cube.train.graph_step's step: captured on CUDA, its very body run eagerly elsewhere (tests)."""
    if world_size > 1:
        raise ValueError(f"the graphed step trains one process alone; {world_size} DDP workers need graphed=False")
    device = model.q_mean.device
    step = GraphedCubeStep(model, loss_cfg, optim_cfg, optim_cfg.batch_size, steps, world_size,
                           capture=device.type == "cuda", compile_step=optim_cfg.compile)
    if state is not None:
        step.restore(*state)
    return step.optimizer, step.scheduler, step.run_epoch


def fit(
    model: CellularCube, train: Split, val: HeldOut, loss_cfg: LossConfig, optim_cfg: OptimConfig, *,
    seed: int = 0, probe: HeldOut | None = None, on_epoch: Callable[[EpochEnd], None] | None = None,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None, world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None, steps_per_epoch: int | None = None,
    graphed: bool | None = None,
) -> Progress:
    """Train `model` on `train` (this process's shard), score `val` after every epoch.

    `wrap` makes the module the optimiser steps through (DDP under Ray Train); `state` is a
    checkpoint's (tensors, meta) from `checkpoint.load_train_state`, to continue where it
    stopped; `probe` is a slice of training pairs scored like `val`, so train-vs-val gaps are
    not an artefact of pool size. Every DDP rank must get the same `steps_per_epoch`.
    `graphed` overrides `optim_cfg.cuda_graphs` (True on a CPU runs the graphed step's body
    uncaptured: how the CPU tests check that path). The model keeps the lattice kernel that
    `optim_cfg.kernel` resolves to (it changes speed, not results).

    Raises:
        ValueError: the shard holds fewer pairs than one batch.
    """
    device = model.q_mean.device
    steps = steps_per_epoch or len(train.q) // optim_cfg.batch_size
    if steps < 1:
        raise ValueError(
            f"{len(train.q)} training pairs make no full batch of optim.batch_size={optim_cfg.batch_size}; "
            "lower optim.batch_size (or use fewer workers)"
        )
    model.use_kernel(lattice_kernel(optim_cfg, model.cfg, device))
    graphed = use_cuda_graphs(optim_cfg, device, world_size) if graphed is None else graphed
    if graphed:
        opt, sched, run_epoch = _graphed_step(model, loss_cfg, optim_cfg, steps, world_size, state)
    else:
        opt, sched, run_epoch = _eager_step(model, loss_cfg, optim_cfg, steps, world_size, state, wrap)
    progress = Progress(**state[1]["progress"]) if state is not None else Progress()
    resumed_from = progress.epoch
    on_device = Split(train.q.to(device), train.a.to(device))
    for epoch in range(progress.epoch, optim_cfg.epochs):
        stats = run_epoch(epoch_batches(on_device, optim_cfg.batch_size, steps, seed, epoch))
        val_metrics = score_held_out(model, val)
        improved = progress.update(val_metrics["mrr"])
        metrics: dict[str, Any] = {"epoch": epoch + 1, **{k.replace("/", "_"): v for k, v in stats.items()},
                                   **_flat("val", val_metrics), "peak_memory_mb": _peak_memory_mb(device),
                                   "improved": improved, "resumed_from": resumed_from}
        if probe is not None:
            metrics.update(_flat("train", score_held_out(model, probe)))
        if on_epoch is not None:
            on_epoch(EpochEnd(metrics, val_metrics, model, opt, sched, progress))
        if progress.should_stop(optim_cfg.patience):
            break  # every rank sees the same val MRR, so all DDP ranks stop together
    return progress
