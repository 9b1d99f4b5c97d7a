"""The cube's training step in JAX + optax, jitted whole: the peer that bench/gpu_step.py races.

Same cube, loss and optimiser as the project (cube/model/cube.py, cube/train/losses.py, cube/train/loop.py),
written the way a JAX NCA is (as CAX does): the state channels-last (N, D, H, W, C), the
perception a `lax.conv_general_dilated`, the per-cell update a dense layer, `lax.scan` over
the lattice steps, global-norm clipping and `optax.adamw` with the project's warm-up + cosine
schedule, and the whole step (forward, loss, gradient, update) one `jax.jit` per step count T.
Parameters come from a torch `CellularCube`, so both frameworks start from the same weights.
Transport init, centring and the residual path are those of the torch model's weights.

    python -m bench.jax_cube --check    # loss, grad norm and weights after 3 steps vs train_epoch

JAX and optax are not dependencies of the project: install them beside torch to run this.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

try:
    import jax
    import jax.numpy as jnp
    import optax
    from jax import lax
except ImportError as e:  # keep the message: the project's own environment never has JAX
    raise ImportError("bench/jax_cube.py needs jax and optax, which the cube project does not depend on; "
                      "install them (pip install jax optax) in the environment that runs the benchmark") from e

from cube.model import CellularCube, CubeConfig
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig, peak_lr

TERMS = ("total", "dialogue", "surface", "internal", "grad_norm")


def params_from_torch(model: CellularCube) -> dict[str, jnp.ndarray]:
    """The torch cube's weights in JAX layouts: dense (in, out), conv DHWIO."""
    c = model.cfg
    if (c.perception, c.adapter, c.normalize_input, c.lattice, c.skip) != ("learned", "linear", False, True, False):
        raise ValueError("the JAX peer implements the default architecture only: learned perception, "
                         "linear adapter, normalize_input=False, lattice=True, skip=False")
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    h = model.cfg.hidden
    return {
        "enc_w": sd["encoder.weight"].T, "enc_b": sd["encoder.bias"],
        "dec_w": sd["decoder.weight"].T, "dec_b": sd["decoder.bias"],
        "perceive_w": sd["rule.perceive.weight"].transpose(2, 3, 4, 1, 0), "perceive_b": sd["rule.perceive.bias"],
        "update_w": sd["rule.update.weight"][:, :h, 0, 0, 0].T, "update_b": sd["rule.update.bias"],
    }


def dense(v: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray, dtype) -> jnp.ndarray:
    return jnp.dot(v.astype(dtype), w.astype(dtype)) + b.astype(dtype)


def lattice(
    p: dict, front: jnp.ndarray, key: jnp.ndarray, cfg: CubeConfig, steps: int, dtype
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """T steps of x ← x + fire·rule(x·keep + inject) on the NDHWC state; returns (state, last dx)."""
    b, k = front.shape[0], cfg.io_channels
    shape = (b, cfg.depth, cfg.height, cfg.width, cfg.channels)
    inject = jnp.zeros(shape, dtype).at[:, 0, :, :, :k].set(front.astype(dtype))
    keep = jnp.ones(shape[1:], dtype).at[0, :, :, :k].set(0)
    w, bias = p["perceive_w"].astype(dtype), p["perceive_b"].astype(dtype)
    uw, ub = p["update_w"].astype(dtype), p["update_b"].astype(dtype)

    def one(carry, step_key):
        x, _ = carry
        x = x * keep + inject
        h = lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + bias
        dx = jnp.dot(jax.nn.relu(h[..., : cfg.hidden]), uw) + ub + h[..., cfg.hidden :]
        if cfg.fire_rate < 1.0:
            dx = dx * jax.random.bernoulli(step_key, cfg.fire_rate, shape[:-1] + (1,)).astype(dtype)
        return (x + dx, dx), None

    zeros = jnp.zeros(shape, dtype)
    (x, dx), _ = lax.scan(one, (zeros, zeros), jax.random.split(key, steps))
    return x, dx


def normalize(v: jnp.ndarray, eps: float = 1e-12) -> jnp.ndarray:
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def loss_terms(p: dict, consts: dict, q: jnp.ndarray, a: jnp.ndarray, key: jnp.ndarray, cfg: CubeConfig,
               loss: LossConfig, steps: int, dtype) -> tuple[jnp.ndarray, dict]:
    """cube.train.losses.cube_loss on the JAX forward: 1−cos + InfoNCE, surface cosine, internal."""
    k, hw = cfg.io_channels, (cfg.height, cfg.width)
    q_c, a_c = q - consts["q_mean"], a - consts["a_mean"]
    front = dense(q_c, p["enc_w"], p["enc_b"], dtype).reshape(-1, k, *hw).transpose(0, 2, 3, 1)  # (B, H, W, k)
    x, dx = lattice(p, front, key, cfg, steps, dtype)
    back = x[:, -1, :, :, :k].transpose(0, 3, 1, 2).reshape(q.shape[0], -1)  # torch's (B, k·H·W) order
    pred = dense(back, p["dec_w"], p["dec_b"], dtype)
    pred = (pred + q_c if cfg.residual else pred).astype(jnp.float32)
    target_face = lax.stop_gradient(dense(a_c, p["enc_w"], p["enc_b"], dtype)).astype(jnp.float32)
    pn, an = normalize(pred), normalize(a_c)
    dialogue = 1.0 - jnp.mean(jnp.sum(pn * an, -1))
    if loss.infonce_weight and q.shape[0] > 1:
        logits = pn @ an.T / loss.temperature
        dialogue = dialogue + loss.infonce_weight * jnp.mean(jax.nn.logsumexp(logits, 1) - jnp.diagonal(logits))
    back = back.astype(jnp.float32)
    cos = jnp.sum(back * target_face, -1) / jnp.maximum(
        jnp.linalg.norm(back, axis=-1) * jnp.linalg.norm(target_face, axis=-1), 1e-8
    )
    terms = {"dialogue": dialogue, "surface": 1.0 - jnp.mean(cos), "internal": jnp.mean(dx.astype(jnp.float32) ** 2)}
    total = loss.dialogue * terms["dialogue"] + loss.surface * terms["surface"] + loss.internal * terms["internal"]
    return total, terms


def schedule(cfg: OptimConfig, steps_per_epoch: int, world_size: int = 1):
    """cube.train.optim.make_optimizer's LambdaLR factor × peak rate, as an optax schedule."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_fraction * total)
    peak = peak_lr(cfg, world_size)

    def lr(count):
        step = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "constant":
            after = jnp.ones_like(step)
        else:
            progress = jnp.minimum(1.0, (step - warmup) / max(1, total - warmup))
            after = 0.05 + 0.95 * 0.5 * (1 + jnp.cos(math.pi * progress))
        return peak * jnp.where(step < warmup, (step + 1) / max(1, warmup), after)

    return lr


@dataclass
class JaxCubeStep:
    """The JAX peer of GraphedCubeStep: `step(q, a)` trains in place and returns the loss."""

    params: dict
    opt_state: object
    key: jnp.ndarray
    fn: object
    consts: dict
    cfg: CubeConfig
    rng: np.random.Generator
    terms: jnp.ndarray | None = None

    @classmethod
    def build(cls, model: CellularCube, loss_cfg: LossConfig, optim_cfg: OptimConfig, steps_per_epoch: int,
              conv_dtype: str = "fp32", seed: int = 0) -> JaxCubeStep:
        """`conv_dtype="bf16"` runs the adapters and the lattice in bf16 (as torch autocast does)
        with fp32 master weights, optimiser and loss."""
        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[conv_dtype]
        clip = [optax.clip_by_global_norm(optim_cfg.grad_clip)] if optim_cfg.grad_clip > 0 else []
        tx = optax.chain(*clip, optax.adamw(schedule(optim_cfg, steps_per_epoch), b1=0.9, b2=0.999, eps=1e-8,
                                            weight_decay=optim_cfg.weight_decay))
        cfg = model.cfg

        def train_step(params, opt_state, key, q, a, consts, steps):
            key, sub = jax.random.split(key)
            grad_fn = jax.value_and_grad(loss_terms, has_aux=True)
            (total, terms), grads = grad_fn(params, consts, q, a, sub, cfg, loss_cfg, steps, dtype)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            out = jnp.stack([total, terms["dialogue"], terms["surface"], terms["internal"], optax.global_norm(grads)])
            return params, opt_state, key, out

        fn = jax.jit(train_step, static_argnames=("steps",), donate_argnums=(0, 1, 2))
        params = jax.tree_util.tree_map(jnp.asarray, params_from_torch(model))
        consts = {"q_mean": jnp.asarray(model.q_mean.cpu().numpy()), "a_mean": jnp.asarray(model.a_mean.cpu().numpy())}
        return cls(params, tx.init(params), jax.random.PRNGKey(seed), fn, consts, cfg, np.random.default_rng(seed))

    def step(self, q: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
        steps = self.cfg.steps + (int(self.rng.integers(0, self.cfg.steps_jitter + 1)) if self.cfg.steps_jitter else 0)
        self.params, self.opt_state, self.key, self.terms = self.fn(
            self.params, self.opt_state, self.key, q, a, self.consts, steps=steps)
        return self.terms[0]


def check(steps: int = 3) -> int:
    """Same weights, data and schedule through train_epoch and the JAX step: losses, grad norms
    and updated weights must agree to fp32 tolerance (fire_rate 1: no random masks)."""
    from cube.train.loop import train_epoch
    from cube.train.optim import make_optimizer

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cudnn.allow_tf32 = False
    cfg = CubeConfig(
        width=5, height=4, depth=3, channels=4, hidden=8, io_channels=2, steps=3, fire_rate=1.0, steps_jitter=0
    )
    optim = OptimConfig(epochs=1, lr=3e-3, warmup_fraction=0.4)
    torch.manual_seed(0)
    model = CellularCube(cfg, 12)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    peer = JaxCubeStep.build(model, LossConfig(), optim, steps_per_epoch=steps)
    data = [(torch.randn(6, 12), torch.randn(6, 12)) for _ in range(steps)]
    opt, sched = make_optimizer(model, optim, steps_per_epoch=steps)
    want = [train_epoch(model, [batch], opt, sched, LossConfig(), optim) for batch in data]
    got = [
        np.asarray(jax.device_get((peer.step(jnp.asarray(q.numpy()), jnp.asarray(a.numpy())), peer.terms)[1]))
        for q, a in data
    ]
    failures = []
    for i, (w, g) in enumerate(zip(want, got)):
        ref = np.array([w["loss/total"], w["loss/dialogue"], w["loss/surface"], w["loss/internal"], w["grad_norm"]])
        if not np.allclose(g, ref, rtol=1e-4, atol=1e-6):
            failures.append(f"step {i}: jax {g} vs torch {ref}")
    for name, value in params_from_torch(model).items():
        if not np.allclose(np.asarray(peer.params[name]), value, rtol=1e-4, atol=1e-5):
            err = np.abs(np.asarray(peer.params[name]) - value).max()
            failures.append(f"weights {name} differ after {steps} steps (max abs err {err:.2e})")
    bf16 = JaxCubeStep.build(
        CellularCube(replace(cfg, fire_rate=0.5, steps_jitter=2), 12), LossConfig(), optim, steps, "bf16"
    )
    losses = [float(bf16.step(jnp.asarray(q.numpy()), jnp.asarray(a.numpy()))) for q, a in data]
    if not np.all(np.isfinite(losses)):
        failures.append(f"bf16 losses not finite: {losses}")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}: torch losses "
        f"{[round(w['loss/total'], 6) for w in want]}, "
        f"jax {[round(float(g[0]), 6) for g in got]}, bf16+fire+jitter {[round(x, 4) for x in losses]}"
    )
    print("\n".join(failures) if failures else "JAX peer matches train_epoch")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="compare with the project's train_epoch on a tiny cube")
    args = p.parse_args()
    if not args.check:
        p.error("nothing to do: pass --check (the timings live in bench/gpu_step.py)")
    sys.exit(check())


if __name__ == "__main__":
    main()
