"""Cube training and held-out scoring in plain PyTorch.

`fit` is the one training loop: Ray Train workers, Tune trials, benchmarks and tests all call
it, each with its own per-epoch callback (report to Ray, checkpoint, collect numbers).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from cube.losses import LossConfig, cube_loss
from cube.metrics import HeldOut, Split, retrieval_metrics
from cube.model import KERNELS, CellularCube, CubeConfig, LatticeKernel


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 8
    batch_size: int = 32  # per worker; InfoNCE negatives come from the same batch
    lr: float = 1e-3  # peak rate at a global batch of lr_reference_batch
    # The rate is scaled linearly with the global batch (workers × batch_size) against this
    # reference (Goyal et al. 2017); 0 turns scaling off. Measured: 2 workers × 32 at the
    # unscaled 1e-3 undertrain in 8 epochs (5-seed test MRR 0.922 vs 0.939 at 2e-3).
    lr_reference_batch: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # of all optimiser steps
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 uses a grad scaler (GPU only)
    patience: int = 0  # epochs without a better val MRR before stopping early; 0 = never stop
    # How the step runs; none of these changes the maths (docs/gpu.md has the measurements).
    # kernel: the lattice conv (cube.model.KERNELS); auto = conv2d on CUDA (1.4-2.2x conv3d on an
    # H100), conv3d elsewhere (the CPU's fastest).
    kernel: Literal["auto", "conv3d", "conv2d", "im2col"] = "auto"
    # cuda_graphs: capture the whole step (cube/graph_step.py); auto = on for one CUDA worker in
    # fp32 or bf16, off otherwise (DDP, CPU, fp16); on = refuse to train without them.
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    compile: bool = False  # also torch.compile each lattice step (needs CUDA graphs and Triton; ~1 min to compile)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"need epochs >= 1 and batch_size >= 2 (InfoNCE needs negatives), got {self.epochs}, {self.batch_size}")
        if self.lr <= 0 or self.lr_reference_batch < 0:
            raise ValueError(f"need lr > 0 and lr_reference_batch >= 0, got {self.lr}, {self.lr_reference_batch}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.kernel not in ("auto", *KERNELS):
            raise ValueError(f"kernel must be auto or one of {KERNELS}, got {self.kernel!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.compile and self.cuda_graphs == "off":
            raise ValueError("compile=true compiles the CUDA-graph step; it needs cuda_graphs auto or on")


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


def peak_lr(cfg: OptimConfig, world_size: int = 1) -> float:
    """`cfg.lr` scaled linearly to the global batch of `world_size` workers."""
    if not cfg.lr_reference_batch:
        return cfg.lr
    return cfg.lr * world_size * cfg.batch_size / cfg.lr_reference_batch


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, steps_per_epoch: int, world_size: int = 1,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr(cfg, world_size), weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_fraction * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def lattice_kernel(cfg: OptimConfig, cube: CubeConfig, device: torch.device) -> LatticeKernel:
    """`cfg.kernel` with auto resolved: conv2d on CUDA for the learned perception, else conv3d."""
    if cfg.kernel != "auto":
        return cfg.kernel
    return "conv2d" if device.type == "cuda" and cube.perception == "learned" else "conv3d"


def use_cuda_graphs(cfg: OptimConfig, device: torch.device, world_size: int) -> bool:
    """`cfg.cuda_graphs` with auto resolved; `on` where graphs cannot run is an error, not a fallback."""
    if cfg.cuda_graphs == "off":
        return False
    blockers = [why for blocked, why in (
        (device.type != "cuda", f"the model is on {device.type}, not a CUDA GPU"),
        (world_size > 1, f"{world_size} DDP workers (a graphed step trains in one process)"),
        (cfg.precision == "fp16", "precision fp16 (its GradScaler syncs with the host; use bf16)"),
    ) if blocked]
    if blockers and (cfg.cuda_graphs == "on" or cfg.compile):
        setting = "optim.compile=true" if cfg.compile else "optim.cuda_graphs=on"
        raise ValueError(f"{setting} needs the CUDA-graph step, which cannot run here: {'; '.join(blockers)}. "
                         "Set optim.cuda_graphs=auto (or off) and optim.compile=false")
    return not blockers


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA GPU; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


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


@torch.no_grad()
def predict(model: CellularCube, q: torch.Tensor, batch_size: int = 256, **lattice_kwargs) -> torch.Tensor:
    """Raw questions (N, E) → centred answer predictions (N, E) on the CPU.

    `lattice_kwargs` go to `CellularCube.run_lattice` (steps, layer_mask, damage)."""
    model.eval()
    device = model.q_mean.device
    return torch.cat([model.predict(chunk.to(device), **lattice_kwargs).float().cpu() for chunk in q.split(batch_size)])


@torch.no_grad()
def score(model: CellularCube, q: torch.Tensor, pool: torch.Tensor, target: torch.Tensor, **lattice_kwargs) -> dict[str, float]:
    """Held-out metrics in the cube's centred space: question i's answer is raw `pool[target[i]]`."""
    return retrieval_metrics(predict(model, q, **lattice_kwargs), pool - model.a_mean.cpu(), target)


def score_held_out(model: CellularCube, data: HeldOut, **lattice_kwargs) -> dict[str, float]:
    return score(model, data.q, data.pool, data.target, **lattice_kwargs)


# ---------------------------------------------------------------- the training loop


def build_model(cfg: CubeConfig, q_mean: torch.Tensor, a_mean: torch.Tensor, device: torch.device | str = "cpu",
                seed: int = 0) -> CellularCube:
    """A fresh cube, centred with the training split's means, channels-last on `device`.

    channels-last 3D is ~15% faster for conv3d on CPU; converting the parameters too keeps
    DDP's gradient buckets in the same layout as the gradients."""
    torch.manual_seed(seed)
    model = CellularCube(cfg, q_mean.shape[-1])
    model.set_centering(q_mean, a_mean)
    return model.to(device, memory_format=torch.channels_last_3d)


def epoch_batches(train: Split, batch_size: int, steps: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
    """cube.graph_step's step: captured on CUDA, its very body run eagerly elsewhere (tests)."""
    from cube.graph_step import GraphedCubeStep  # it builds on this module

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
        raise ValueError(f"{len(train.q)} training pairs make no full batch of optim.batch_size={optim_cfg.batch_size}; "
                         "lower optim.batch_size (or use fewer workers)")
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


def training_state(opt: torch.optim.Optimizer, sched: Any, extra: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser, scheduler and RNG state split into tensors (safetensors) and JSON."""
    sd = opt.state_dict()
    for group in sd["param_groups"]:  # the graphed step's rate is a device tensor; JSON wants a number
        group["lr"] = float(group["lr"])
    tensors = {f"opt.{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"param_groups": sd["param_groups"], "scheduler": sched.state_dict(), **extra}
    return tensors, meta


IMPLEMENTATION_FLAGS = ("capturable", "foreach", "fused", "differentiable")


def restore_training_state(opt: torch.optim.Optimizer, sched: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    # The saved hyperparameters, with this optimiser's implementation flags: a checkpoint of the
    # graphed step (capturable AdamW) resumes eagerly and the other way round.
    groups = [{**saved, **{k: live[k] for k in IMPLEMENTATION_FLAGS if k in live}}
              for saved, live in zip(meta["param_groups"], opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # the rate of the next step, whoever saved it
        if not torch.is_tensor(group["lr"]):
            group["lr"] = lr
    torch.set_rng_state(tensors["rng.torch"])
