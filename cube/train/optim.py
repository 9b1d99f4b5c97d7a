"""The optimiser side of training: its config, AdamW with warm-up and cosine decay, the
learning rate's scaling with the global batch, how the step runs (kernel, CUDA graphs,
precision), and the optimiser/scheduler/RNG state that checkpoints carry."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from cube.model import KERNELS, CubeConfig, LatticeKernel


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 8
    batch_size: int = 32  # per worker; InfoNCE negatives come from the same batch
    lr: float = 1e-3  # peak rate at a global batch of lr_reference_batch
    # The rate is scaled linearly with the global batch (workers × batch_size) against this
    # reference (Goyal et al. 2017); 0 turns scaling off. Measured: 2 workers × 32 at the
    # unscaled 1e-3 undertrain in 8 epochs (5-seed test MRR 0.922 vs 0.939 at 2e-3).
    lr_reference_batch: int = 32
    # ... but never above max_lr (nor above lr itself where lr is set higher): 64 workers × 256 would
    # otherwise give AdamW a peak near 0.5, where it diverges. Linear scaling is kept below the
    # cap because it is what was measured to help at the sizes this project trains.
    max_lr: float = 1e-2
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
    # TF32 on CUDA (10-bit mantissa products, fp32 sums): torch = its defaults (convs in TF32,
    # matmuls strict), on = both in TF32, off = strict fp32 everywhere. bench/gpu_ray.py compares
    # their validation MRR; docs/gpu.md says what it measured.
    tf32: Literal["torch", "on", "off"] = "torch"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(
                f"need epochs >= 1 and batch_size >= 2 (InfoNCE needs negatives), got {self.epochs}, {self.batch_size}"
            )
        if self.lr <= 0 or self.lr_reference_batch < 0 or self.max_lr <= 0:
            raise ValueError(f"need lr > 0, max_lr > 0 and lr_reference_batch >= 0, got {self.lr}, {self.max_lr}, "
                             f"{self.lr_reference_batch}")
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
        if self.tf32 not in ("torch", "on", "off"):
            raise ValueError(f"tf32 must be torch, on or off, got {self.tf32!r}")
        if self.compile and self.cuda_graphs == "off":
            raise ValueError("compile=true compiles the CUDA-graph step; it needs cuda_graphs auto or on")


def peak_lr(cfg: OptimConfig, world_size: int = 1) -> float:
    """`cfg.lr` scaled linearly to the global batch of `world_size` workers, capped at
    max(cfg.max_lr, cfg.lr): scaling never takes the rate past the cap, an explicit lr is kept."""
    if not cfg.lr_reference_batch:
        return cfg.lr
    scaled = cfg.lr * world_size * cfg.batch_size / cfg.lr_reference_batch
    return min(scaled, max(cfg.max_lr, cfg.lr))


COSINE_FLOOR = 0.05  # the cosine decays to this share of the peak rate, not to zero


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, steps_per_epoch: int, world_size: int = 1,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """AdamW over the trainable parameters, at `peak_lr`, with a linear warm-up over
    `warmup_fraction` of all steps, then a cosine decay to COSINE_FLOOR of the peak (or a constant
    rate): torch's own schedulers, one step per optimiser step."""
    peak = peak_lr(cfg, world_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=peak,
                            weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_fraction * total)
    if cfg.schedule == "constant":
        after: LRScheduler = ConstantLR(opt, factor=1.0, total_iters=0)
    else:
        after = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=COSINE_FLOOR * peak)
    return opt, with_warmup(opt, after, warmup)


def with_warmup(opt: torch.optim.Optimizer, after: LRScheduler, warmup: int) -> LRScheduler:
    """`after`, preceded by a linear warm-up to the peak over `warmup` steps (none when 0)."""
    if warmup == 0:
        return after
    ramp = LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(1, warmup - 1))
    return SequentialLR(opt, [ramp, after], milestones=[warmup])


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


def autocast(precision: str, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device`. `cache=False` for a CUDA graph: the
    cache of cast weights would live outside the graph's memory pool."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA GPU; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def training_state(
    opt: torch.optim.Optimizer, sched: Any, extra: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimiser and scheduler state split into tensors (safetensors) and JSON. No RNG state:
    `fit` reseeds every epoch (cube.train.loop.epoch_seed), so a resume is exact without it."""
    sd = opt.state_dict()
    for group in sd["param_groups"]:  # the graphed step's rate is a device tensor; JSON wants a number
        group["lr"] = float(group["lr"])
    tensors = {f"opt.{pid}.{k}": v for pid, st in sd["state"].items() for k, v in st.items()}
    meta = {"param_groups": sd["param_groups"], "scheduler": sched.state_dict(), **extra}
    return tensors, meta


IMPLEMENTATION_FLAGS = ("capturable", "foreach", "fused", "differentiable")


def restore_training_state(
    opt: torch.optim.Optimizer, sched: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    # The saved hyperparameters, with this optimiser's implementation flags: a checkpoint of the
    # graphed step (capturable AdamW) resumes eagerly and the other way round.
    # The graphed step's own optimiser has no scheduler, so its groups carry no initial_lr: keep ours.
    groups = [{**{k: live[k] for k in ("initial_lr",) if k in live}, **saved,
               **{k: live[k] for k in IMPLEMENTATION_FLAGS if k in live}}
              for saved, live in zip(meta["param_groups"], opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})
    sched.load_state_dict(meta["scheduler"])
    for group, lr in zip(opt.param_groups, sched.get_last_lr()):  # the rate of the next step, whoever saved it
        if not torch.is_tensor(group["lr"]):
            group["lr"] = lr
