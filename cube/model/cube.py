"""The cellular cube: one shared NCA update rule on a 3D lattice, between two adapters.

    question embedding (E) ──encoder──▶ front face (k×H×W), re-injected every step
    lattice state (C×D×H×W) ──T steps of  x ← x + fire_mask · rule(perceive(x))
    back face (k×H×W) ──decoder──▶ predicted answer embedding (E)
    (skip: + front face ──skip──▶ E, so that the lattice adds to a direct map)

All cells share one rule; the lattice update is a handful of conv3d calls, never a
per-cell loop. Embeddings are centred with training-split means that live in the model's
buffers (and so in the checkpoint), because raw LLM states are dominated by their mean.
"""


from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cube.model.config import CubeConfig
from cube.model.rule import KERNELS, LatticeKernel, UpdateRule


class CubeOutput(NamedTuple):
    pred: torch.Tensor  # (B, E) predicted answer embedding, centred space
    back: torch.Tensor  # (B, k, H, W) back face read out
    last_update: torch.Tensor  # (B, C, D, H, W) the final step's dx (after the fire mask)


class CellularCube(nn.Module):
    def __init__(self, cfg: CubeConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        k, face = cfg.io_channels, cfg.face
        if cfg.adapter == "mlp":  # the face starts as an MLP's hidden layer; the lattice works on it
            self.encoder: nn.Module = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, k * face), nn.GELU())
        else:
            self.encoder = nn.Linear(embed_dim, k * face)
        self.decoder = nn.Linear(k * face, embed_dim)
        self.skip = nn.Linear(k * face, embed_dim) if cfg.skip else None
        # residual: start exactly at the identity baseline, then improve on it; skip: start at the
        # direct path, the lattice's correction at zero
        zeroed = [self.decoder] if cfg.residual or cfg.skip else []
        if self.skip is not None and cfg.residual:
            zeroed.append(self.skip)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.rule = UpdateRule(cfg)
        # The ablation keeps the rule (one checkpoint shape for both) but frozen: under DDP a
        # parameter that never gets a gradient would stall the gradient all-reduce. With skip,
        # the ablation is the skip path alone: the back face's decoder stays frozen at zero.
        self.rule.requires_grad_(cfg.lattice)
        if self.skip is not None:
            self.decoder.requires_grad_(cfg.lattice)
        # Centring statistics from the training split; set by `set_centering`, saved with the weights.
        self.register_buffer("q_mean", torch.zeros(embed_dim))
        self.register_buffer("a_mean", torch.zeros(embed_dim))

    def use_kernel(self, kernel: LatticeKernel) -> CellularCube:
        """Compute the lattice's conv with `kernel` (see KERNELS); the weights are unchanged."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if kernel != "conv3d" and self.cfg.perception != "learned":
            raise ValueError(f"kernel={kernel!r} computes the learned 3x3x3 perception; perception="
                             f"{self.cfg.perception!r} runs only with kernel='conv3d'")
        self.rule.kernel = kernel
        return self

    @torch.no_grad()
    def set_centering(self, q_mean: torch.Tensor, a_mean: torch.Tensor) -> None:
        self.q_mean.copy_(q_mean)
        self.a_mean.copy_(a_mean)

    def prepare(self, v: torch.Tensor) -> torch.Tensor:
        """A centred embedding as the adapters and the residual see it."""
        return F.normalize(v, dim=-1) if self.cfg.normalize_input else v

    def encode_face(self, v: torch.Tensor) -> torch.Tensor:
        """Centred embedding (B, E) → surface values (B, k, H, W)."""
        c = self.cfg
        return self.encoder(self.prepare(v)).view(-1, c.io_channels, c.height, c.width)

    def lattice_inputs(self, front: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Front face (B, k, H, W) → (zero state, injection, keep mask), each (·, C, D, H, W),
        channels-last: what `step` needs, built once per forward rather than once per step."""
        c = self.cfg
        b = front.shape[0]
        x = front.new_zeros(b, c.channels, c.depth, c.height, c.width).contiguous(memory_format=torch.channels_last_3d)
        clamp = torch.zeros_like(x[:1])
        clamp[:, : c.io_channels, 0] = 1.0  # (1, C, D, H, W): where the question is held
        inject = F.pad(front, (0, 0, 0, 0, 0, c.channels - c.io_channels)).unsqueeze(2)  # (B, C, 1, H, W)
        inject = F.pad(inject, (0, 0, 0, 0, 0, c.depth - 1))  # (B, C, D, H, W), zero behind the front
        return x, inject.contiguous(memory_format=torch.channels_last_3d), 1 - clamp

    def fire_mask(self, x: torch.Tensor) -> torch.Tensor | float | None:
        """This step's multiplier on the update: a random cell mask in training, the mean-field
        rate in evaluation (deterministic), None when every cell always fires."""
        c = self.cfg
        if c.fire_rate >= 1.0:
            return None
        if not self.training:
            return c.fire_rate
        return torch.rand(x.shape[0], 1, c.depth, c.height, c.width, device=x.device) < c.fire_rate

    def update(
        self, x: torch.Tensor, inject: torch.Tensor, keep: torch.Tensor, fire: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the question on the front face, then the rule's update scaled by `fire`.
        Returns (clamped state, dx); `step` adds them, `run_lattice` may edit dx first."""
        x = torch.addcmul(inject, x, keep)  # x·keep + inject: the front face holds the question
        dx = self.rule(x)
        if fire is not None:  # a bool mask multiplies without a cast of its own
            dx = dx * fire
        return x, dx

    def step(
        self, x: torch.Tensor, inject: torch.Tensor, keep: torch.Tensor, fire: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pure lattice step (no host randomness, no analysis hooks): the unit that the
        GPU fast path (cube.train.graph_step) captures or compiles. Returns (next state, dx)."""
        x, dx = self.update(x, inject, keep, fire)
        return x + dx, dx

    def draw_steps(self) -> int:
        """T for this forward: `steps`, plus U{0..steps_jitter} in training (drawn on the host from
        the CPU generator), so that T is not a cliff edge. The ablation has no lattice to jitter."""
        c = self.cfg
        if self.training and c.steps_jitter and c.lattice:
            return c.steps + int(torch.randint(0, c.steps_jitter + 1, ()))
        return c.steps

    def run_lattice(
        self, front: torch.Tensor, steps: int | None = None, layer_mask: torch.Tensor | None = None,
        damage: tuple[int, torch.Tensor] | None = None, step_fn: LatticeStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T steps (`draw_steps()` unless given) with `front` (B, k, H, W) clamped onto the front face.

        `step_fn` computes one step (default `lattice_step` below; the GPU step passes a compiled
        one). `layer_mask` (D,) scales each depth layer's update (1 = normal, 0 =
        frozen) and `damage` = (step, mask (D, H, W)) zeroes cells once; both exist for
        `cube analyze`. Returns the final state (B, C, D, H, W) and the last applied update.
        """
        x, inject, keep = self.lattice_inputs(front)
        dx = torch.zeros_like(x)
        steps = self.draw_steps() if steps is None else steps
        step_fn = step_fn or lattice_step
        for t in range(steps):
            if layer_mask is None and damage is None:
                x, dx = step_fn(self, x, inject, keep)
                continue
            x, dx = self.update(x, inject, keep, self.fire_mask(x))
            if layer_mask is not None:
                dx = dx * layer_mask.view(1, 1, -1, 1, 1)
            x = x + dx
            if damage is not None and t == damage[0]:
                x = x * (1 - damage[1].to(x.dtype))
        return x, dx

    def readout(
        self, q_centred: torch.Tensor, front: torch.Tensor, state: torch.Tensor, last_update: torch.Tensor,
    ) -> CubeOutput:
        """Final state → CubeOutput: the back face through the decoder (plus the front face
        through the skip, and the question if residual)."""
        return self.decode(q_centred, front, state[:, : self.cfg.io_channels, -1], last_update)

    def decode(
        self, q_centred: torch.Tensor, front: torch.Tensor, back: torch.Tensor, last_update: torch.Tensor,
    ) -> CubeOutput:
        pred = self.decoder(back.flatten(1))  # back, front: (B, k, H, W)
        if self.skip is not None:
            pred = pred + self.skip(front.flatten(1))
        if self.cfg.residual:
            pred = pred + self.prepare(q_centred)
        return CubeOutput(pred, back, last_update)

    def forward(self, q_centred: torch.Tensor, **lattice_kwargs) -> CubeOutput:
        """(B, E) centred question → CubeOutput with the centred answer prediction."""
        front = self.encode_face(q_centred)
        if not self.cfg.lattice:  # ablation: the same adapters with nothing in between
            back = front if self.skip is None else torch.zeros_like(front)  # with skip: the direct path alone
            return self.decode(q_centred, front, back, front.new_zeros(()))
        state, dx = self.run_lattice(front, **lattice_kwargs)
        return self.readout(q_centred, front, state, dx)

    def predict(self, q: torch.Tensor, **lattice_kwargs) -> torch.Tensor:
        """Raw question embeddings (B, E) → centred answer predictions (B, E)."""
        return self(q - self.q_mean, **lattice_kwargs).pred


def lattice_step(
    model: CellularCube, x: torch.Tensor, inject: torch.Tensor, keep: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One lattice step with this step's fire mask: the unit `torch.compile` fuses on the GPU
    (the mask's random draw, the clamp, bias, relu and residual adds around the two convs)."""
    return model.step(x, inject, keep, model.fire_mask(x))


LatticeStep = Callable[[CellularCube, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
