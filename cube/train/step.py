"""One training step and one epoch of them: the maths that the eager loop and the CUDA-graph step
(cube/train/graph_step.py) both run, written once.

A step never syncs with the device: its loss terms and gradient norm stay device tensors, and
the epoch checks them for non-finite values every `CHECK_EVERY` steps and at its end, so that a
diverged run stops with one clear error instead of training on NaN weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from cube.model import CellularCube, LatticeStep
from cube.train.losses import LossConfig, cube_loss
from cube.train.optim import OptimConfig, autocast

TERMS = ("total", "dialogue", "surface", "internal", "grad_norm")
CHECK_EVERY = 256  # steps between the host's looks at the running non-finite flag (one sync each)


class DivergenceError(ValueError):
    """The loss, the gradients or the predictions became non-finite; the message says where and
    what to lower. A ValueError, so jobs report it as one line (with the traceback in the log)."""


def loss_terms(
    model: CellularCube, net: nn.Module, q: torch.Tensor, a: torch.Tensor, loss_cfg: LossConfig, precision: str,
    steps: int, step_fn: LatticeStep | None = None, autocast_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """Forward and loss of one batch of raw (question, answer) embeddings (B, E), T = `steps`.

    `net` is what the forward runs through (the model, or DDP around it); `model` is the bare
    cube, whose centring and adapters make the surface target."""
    q_c, a_c = q - model.q_mean, a - model.a_mean
    kwargs = {"steps": steps, "step_fn": step_fn} if model.cfg.lattice else {}
    with autocast(precision, q.device, cache=autocast_cache):
        out = net(q_c, **kwargs)
        with torch.no_grad():
            target_face = model.encode_face(a_c)
        return cube_loss(out, a_c, target_face, loss_cfg)


def train_step(
    model: CellularCube, net: nn.Module, q: torch.Tensor, a: torch.Tensor, opt: torch.optim.Optimizer,
    params: Sequence[torch.Tensor], loss_cfg: LossConfig, optim_cfg: OptimConfig, steps: int, *,
    scaler: torch.amp.GradScaler | None = None, step_fn: LatticeStep | None = None, autocast_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """One optimiser step: zero the gradients in place, loss, backward, clip, step. Returns the
    loss terms and the gradient norm before clipping, as device tensors (no host sync)."""
    opt.zero_grad(set_to_none=False)  # in place: the graphed step's gradients live at fixed addresses
    terms = loss_terms(model, net, q, a, loss_cfg, optim_cfg.precision, steps, step_fn, autocast_cache)
    if scaler is not None:
        scaler.scale(terms["total"]).backward()
        scaler.unscale_(opt)
    else:
        terms["total"].backward()
    clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
    foreach = True if q.device.type == "cuda" else None
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, clip, foreach=foreach)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return terms


def divergence_message(epoch: int, step: int, steps: int, lr: float, optim_cfg: OptimConfig) -> str:
    return (f"training diverged at epoch {epoch + 1}, step {step + 1} of {steps}: the loss or the gradient norm "
            f"became non-finite (NaN or inf). Lower optim.lr (the peak rate was {lr:.3g}), keep optim.grad_clip > 0 "
            f"(now {optim_cfg.grad_clip:g}), or train in fp32 (now {optim_cfg.precision})")


def run_epoch(
    step: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]], batches: Iterable[tuple[torch.Tensor, ...]],
    device: torch.device, epoch: int, steps: int, peak_lr: float, optim_cfg: OptimConfig,
) -> dict[str, float]:
    """Run `step` over `batches` of raw (question, answer) embeddings; returns mean loss terms,
    mean gradient norm and samples/s.

    Raises:
        DivergenceError: a step's loss or gradient norm was non-finite (naming the first one).
        RuntimeError: there were no batches.
    """
    sums = torch.zeros(len(TERMS), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first non-finite step, -1 = none yet
    n_batches, n_samples, start = 0, 0, time.perf_counter()
    for q, a in batches:
        terms = step(q.to(device, non_blocking=True), a.to(device, non_blocking=True))
        values = torch.stack([terms[k].detach().float() for k in TERMS])
        bad = ~torch.isfinite(values).all()
        first_bad = torch.where(bad & (first_bad < 0), n_batches, first_bad)
        sums += values
        n_batches += 1
        n_samples += q.shape[0]
        if n_batches % CHECK_EVERY == 0 and first_bad.item() >= 0:
            break
    if n_batches == 0:
        raise RuntimeError("this worker received no training batches; use fewer workers or a smaller batch_size")
    if first_bad.item() >= 0:
        raise DivergenceError(divergence_message(epoch, int(first_bad), steps, peak_lr, optim_cfg))
    elapsed = time.perf_counter() - start
    means = (sums / n_batches).tolist()
    out = {f"loss/{k}" if k != "grad_norm" else k: v for k, v in zip(TERMS, means)}
    out["samples_per_s"] = n_samples / elapsed
    return out
