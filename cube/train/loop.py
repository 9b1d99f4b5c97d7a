"""The one training loop, `fit`, in plain PyTorch.

Ray Train workers, Tune trials, benchmarks and tests all call it, each with its own
per-epoch callback (report to Ray, checkpoint, collect numbers).
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from cube.eval.inference import score_held_out
from cube.eval.metrics import HeldOut, Split
from cube.model import CellularCube, CubeConfig
from cube.train.graph_step import GraphedCubeStep
from cube.train.losses import LossConfig
from cube.train.optim import (
    OptimConfig,
    lattice_kernel,
    make_optimizer,
    restore_training_state,
    training_state,
    use_cuda_graphs,
)
from cube.train.step import DivergenceError, run_epoch, train_step


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
    sched: LRScheduler, loss_cfg: LossConfig, optim_cfg: OptimConfig,
    scaler: torch.amp.GradScaler | None = None, epoch: int = 0, steps: int = 0,
) -> dict[str, float]:
    """Train on `batches` of raw (question, answer) embeddings through `model` (the cube, or DDP
    around it); return mean loss terms, mean gradient norm, samples/s and the rate.

    Raises:
        DivergenceError: a step's loss or gradient norm was non-finite.
    """
    core = unwrap(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(q: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = train_step(core, model, q, a, opt, params, loss_cfg, optim_cfg, core.draw_steps(), scaler=scaler)
        sched.step()
        return terms

    out = run_epoch(step, batches, core.q_mean.device, epoch, steps, opt.param_groups[0]["initial_lr"], optim_cfg)
    return {**out, "lr": sched.get_last_lr()[0]}


def build_model(cfg: CubeConfig, q_mean: torch.Tensor, a_mean: torch.Tensor, device: torch.device | str = "cpu",
                seed: int = 0) -> CellularCube:
    """A fresh cube, centred with the training split's means, channels-last on `device`.

    channels-last 3D is ~15% faster for conv3d on CPU; converting the parameters too keeps
    DDP's gradient buckets in the same layout as the gradients."""
    torch.manual_seed(seed)
    model = CellularCube(cfg, q_mean.shape[-1])
    model.set_centering(q_mean, a_mean)
    return model.to(device, memory_format=torch.channels_last_3d)


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch → that epoch's batches (q, a)


def shuffled_batches(train: Split, batch_size: int, seed: int) -> Batches:
    """Full batches of `train` (in memory), reshuffled every epoch; the order depends only on
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        steps = len(train.q) // batch_size
        order = torch.randperm(len(train.q), generator=gen)[: steps * batch_size].to(train.q.device)
        for idx in order.split(batch_size):
            yield train.q[idx], train.a[idx]

    return epoch_batches


def take(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The first `steps` batches, then the rest of the iterable run to its end unused, so that a
    source that counts what it streamed, or must be drained before its next epoch, finishes."""
    it = iter(batches)
    yield from islice(it, steps)
    for _ in it:
        pass


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The RNG seed of one rank's epoch (fire masks, step jitter): a resumed run reseeds where the
    uninterrupted one did, so resuming is exact without saving any RNG state."""
    return (seed * 1_000_003 + epoch) * 1_009 + rank


@dataclass
class EpochEnd:
    """What `fit` hands its callback after each epoch: numbers to report, state to checkpoint."""

    metrics: dict[str, Any]
    val: dict[str, float]  # this epoch's validation metrics, unflattened (cos, recall@1, recall@5, mrr)
    model: CellularCube
    opt: torch.optim.Optimizer
    sched: LRScheduler
    progress: Progress

    def train_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return training_state(self.opt, self.sched, {"progress": asdict(self.progress)})


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _flat(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k.replace('@', '_at_')}": v for k, v in metrics.items()}


RunEpoch = Callable[[Iterable[tuple[torch.Tensor, torch.Tensor]], int], dict[str, float]]  # (batches, epoch)
StepParts = tuple[torch.optim.Optimizer, LRScheduler, RunEpoch]


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

    def one_epoch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], epoch: int) -> dict[str, float]:
        return train_epoch(net, batches, opt, sched, loss_cfg, optim_cfg, scaler, epoch=epoch, steps=steps)

    return opt, sched, one_epoch


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
    model: CellularCube, train: Split | Batches, val: HeldOut | None, loss_cfg: LossConfig, optim_cfg: OptimConfig,
    *, seed: int = 0, rank: int = 0, probe: HeldOut | None = None, on_epoch: Callable[[EpochEnd], None] | None = None,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None, world_size: int = 1,
    wrap: Callable[[nn.Module], nn.Module] | None = None, steps_per_epoch: int | None = None,
    graphed: bool | None = None, share: Callable[[Any], Any] | None = None,
) -> Progress:
    """Train `model` on `train`, score `val` after every epoch.

    `train` is this process's training pairs in memory (shuffled every epoch), or a function from
    the epoch to its batches (a Ray Data shard's stream) with `steps_per_epoch` given: every DDP
    rank must take the same number of steps. `wrap` makes the module the optimiser steps through
    (DDP under Ray Train); `state` is a checkpoint's (tensors, meta) from
    `checkpoint.load_train_state`, to continue where it stopped; `probe` is a slice of training
    pairs scored like `val`, so train-vs-val gaps are not an artefact of pool size. Under DDP
    only rank 0 needs `val` and `probe`: `share` hands rank 0's scores to every rank, so that all
    stop on the same numbers. `graphed` overrides `optim_cfg.cuda_graphs` (True on a CPU runs the
    graphed step's body uncaptured: how the CPU tests check that path). The model keeps the
    lattice kernel that `optim_cfg.kernel` resolves to (it changes speed, not results).

    Raises:
        ValueError: the shard holds fewer pairs than one batch.
        DivergenceError: the loss, the gradients or the validation predictions became non-finite.
    """
    device = model.q_mean.device
    if isinstance(train, Split):
        steps = steps_per_epoch or len(train.q) // optim_cfg.batch_size
        pairs = len(train.q)
        train = shuffled_batches(Split(train.q.to(device), train.a.to(device)), optim_cfg.batch_size, seed)
    elif steps_per_epoch is None:
        raise ValueError("fit(train=<a function of the epoch>) needs steps_per_epoch")
    else:
        steps, pairs = steps_per_epoch, steps_per_epoch * optim_cfg.batch_size
    if steps < 1:
        raise ValueError(
            f"{pairs} training pairs make no full batch of optim.batch_size={optim_cfg.batch_size}; "
            "lower optim.batch_size (or use fewer workers)"
        )
    model.use_kernel(lattice_kernel(optim_cfg, model.cfg, device))
    graphed = use_cuda_graphs(optim_cfg, device, world_size) if graphed is None else graphed
    if graphed:
        opt, sched, one_epoch = _graphed_step(model, loss_cfg, optim_cfg, steps, world_size, state)
    else:
        opt, sched, one_epoch = _eager_step(model, loss_cfg, optim_cfg, steps, world_size, state, wrap)
    progress = Progress(**state[1]["progress"]) if state is not None else Progress()
    resumed_from = progress.epoch
    for epoch in range(progress.epoch, optim_cfg.epochs):
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        stats = one_epoch(take(train(epoch), steps), epoch)
        scores = None
        if val is not None:
            scores = {"val": score_held_out(model, val),
                      **({"train": score_held_out(model, probe)} if probe is not None else {})}
        scores = share(scores) if share is not None else scores
        if scores is None:
            raise ValueError("fit needs `val` (on rank 0, with `share` for the other ranks)")
        val_metrics = scores["val"]
        if val_metrics["nonfinite"] > 0:
            raise DivergenceError(f"training diverged at epoch {epoch + 1}: {val_metrics['nonfinite']:.0%} of the "
                                  "validation predictions are non-finite (NaN or inf) although the loss was finite; "
                                  f"lower optim.lr (the peak rate was {opt.param_groups[0]['initial_lr']:.3g})")
        improved = progress.update(val_metrics["mrr"])
        stop = progress.should_stop(optim_cfg.patience)
        metrics: dict[str, Any] = {"epoch": epoch + 1, **{k.replace("/", "_"): v for k, v in stats.items()},
                                   **_flat("val", val_metrics), "best_val_mrr": progress.best_val_mrr,
                                   "peak_memory_mb": _peak_memory_mb(device), "improved": improved,
                                   "resumed_from": resumed_from, "finished": stop or epoch + 1 == optim_cfg.epochs}
        if "train" in scores:
            metrics.update(_flat("train", scores["train"]))
        if on_epoch is not None:
            on_epoch(EpochEnd(metrics, val_metrics, model, opt, sched, progress))
        if stop:
            break  # every rank sees the same val MRR, so all DDP ranks stop together
    return progress
