"""The cellular cube: one shared NCA update rule on a 3D lattice, between two adapters.

    question embedding (E) ──encoder──▶ front face (k×H×W), re-injected every step
    lattice state (C×D×H×W) ──T steps of  x ← x + fire_mask · rule(perceive(x))
    back face (k×H×W) ──decoder──▶ predicted answer embedding (E)

All cells share one rule; the lattice update is a handful of conv3d calls, never a
per-cell loop. Embeddings are centred with training-split means that live in the model's
buffers (and so in the checkpoint), because raw LLM states are dominated by their mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CubeConfig:
    width: int = 15
    height: int = 15
    depth: int = 11
    channels: int = 8  # state channels per cell
    hidden: int = 32  # width of the per-cell MLP
    io_channels: int = 4  # channels injected at the front face and read at the back face
    steps: int = 12  # must be >= depth - 1 so the front can reach the back
    perception: Literal["learned", "sobel"] = "learned"
    fire_rate: float = 0.75  # probability that a cell updates on a training step
    transport_init: bool = True  # untrained rule copies each cell's front neighbour (see README)
    residual: bool = True  # predict question + correction rather than the answer from scratch
    steps_jitter: int = 4  # training runs steps + U{0..jitter} steps, so that T is not a cliff edge
    adapter: Literal["linear", "mlp"] = "linear"  # question → face: linear, or LayerNorm → linear → GELU
    normalize_input: bool = False  # L2-normalise the centred question, as the centred baselines do
    lattice: bool = True  # False: the decoder reads the front face directly (the ablation that shows what the lattice adds)

    def __post_init__(self) -> None:
        for name in ("width", "height", "depth", "channels", "hidden", "io_channels", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.io_channels > self.channels:
            raise ValueError(f"io_channels ({self.io_channels}) cannot exceed channels ({self.channels})")
        if self.steps < self.depth - 1:
            raise ValueError(
                f"steps={self.steps} < depth-1={self.depth - 1}: information injected at the front "
                "face moves one cell per step and would never reach the back face"
            )
        if self.steps_jitter < 0:
            raise ValueError(f"steps_jitter must be >= 0, got {self.steps_jitter}")
        if not 0.0 < self.fire_rate <= 1.0:
            raise ValueError(f"fire_rate must be in (0, 1], got {self.fire_rate}")
        if self.perception not in ("learned", "sobel"):
            raise ValueError(f"perception must be 'learned' or 'sobel', got {self.perception!r}")
        if self.adapter not in ("linear", "mlp"):
            raise ValueError(f"adapter must be 'linear' or 'mlp', got {self.adapter!r}")
        if self.transport_init and self.perception != "learned":
            raise ValueError("transport_init needs perception='learned' (fixed Sobel filters have no front tap); set transport_init=false")

    @property
    def face(self) -> int:
        return self.width * self.height


class CubeOutput(NamedTuple):
    pred: torch.Tensor  # (B, E) predicted answer embedding, centred space
    back: torch.Tensor  # (B, k, H, W) back face read out
    last_update: torch.Tensor  # (B, C, D, H, W) the final step's dx (after the fire mask)


# How the rule's 3×3×3 conv is computed; all three give the same numbers up to rounding.
# "conv3d" is cuDNN/oneDNN's conv3d (the CPU's best). The others work on the channels-last
# cells (B, D, H, W, C) and run the per-cell update as a matmul: "conv2d" folds the three depth
# taps into channels and runs a 3×3 conv2d over (H, W) with 3C inputs (the GPU's convolution
# kernels are tuned for conv2d, not for a conv3d with 8 input channels); "im2col" gathers all
# 27 taps (27C values per cell) and runs one matmul: the plainest form, slower everywhere it
# was measured (it writes 27 copies of the state per step; docs/gpu.md).
LatticeKernel = Literal["conv3d", "conv2d", "im2col"]
KERNELS: tuple[str, ...] = get_args(LatticeKernel)


class _DepthTaps(torch.autograd.Function):
    """Cells (B, D, H, W, C) → (B, D, H, W, 3C): each cell's channels after those of the cell in
    front of it and before those of the cell behind it (zeros past the ends). Written by hand
    because autograd's pad + slices + cat spends its backward zero-filling padded copies."""

    @staticmethod
    def forward(ctx, cells: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = cells.shape
        out = cells.new_empty(b, d, h, w, 3 * c)
        out[:, :1, ..., :c] = 0
        out[:, 1:, ..., :c] = cells[:, :-1]
        out[..., c : 2 * c] = cells
        out[:, :-1, ..., 2 * c :] = cells[:, 1:]
        out[:, -1:, ..., 2 * c :] = 0
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        c = grad.shape[-1] // 3
        cells = grad[..., c : 2 * c].contiguous()
        cells[:, :-1] += grad[:, 1:, ..., :c]
        cells[:, 1:] += grad[:, :-1, ..., 2 * c :]
        return cells


def _identity_kernel() -> torch.Tensor:
    k = torch.zeros(1, 3, 3, 3)
    k[0, 1, 1, 1] = 1.0
    return k


def _sobel_kernels() -> torch.Tensor:
    """Fixed 3D Sobel filters ∂/∂z, ∂/∂y, ∂/∂x (Growing NCA's perception, in 3D)."""
    smooth = torch.tensor([1.0, 2.0, 1.0])
    diff = torch.tensor([-1.0, 0.0, 1.0])
    dz = torch.einsum("i,j,k->ijk", diff, smooth, smooth)
    dy = torch.einsum("i,j,k->ijk", smooth, diff, smooth)
    dx = torch.einsum("i,j,k->ijk", smooth, smooth, diff)
    return torch.stack([dz, dy, dx]) / 16.0  # (3, 3, 3, 3)


class UpdateRule(nn.Module):
    """The one rule every cell shares: perceive the 3×3×3 neighbourhood, then a per-cell MLP.

    Perception and the MLP's first layer are one dense conv3d (the learned-perception NCA of
    Randazzo et al.), because on CPU a dense conv runs ~5× closer to matmul peak than a
    depthwise conv followed by 1×1 layers. The same conv also yields a linear path to dx.

    `transport_init` starts that linear path as "copy the front neighbour", so an untrained cube
    already carries the injected question to the back face in depth-1 steps. With a
    zero-initialised MLP alone (the Growing-NCA recipe) the back face starts at zero and its
    gradient w.r.t. the rule vanishes to order depth-1: the cube never starts learning.
    """

    def __init__(self, cfg: CubeConfig) -> None:
        super().__init__()
        c, h = cfg.channels, cfg.hidden
        self.cfg = cfg
        if cfg.perception == "sobel":  # fixed identity + three gradient filters per channel
            kernels = torch.cat([_identity_kernel(), _sobel_kernels()]).repeat(c, 1, 1, 1).unsqueeze(1)
            self.register_buffer("sobel", kernels)  # (4C, 1, 3, 3, 3)
            self.perceive = nn.Conv3d(4 * c, h + c, kernel_size=1)
        else:
            self.perceive = nn.Conv3d(c, h + c, kernel_size=3, padding=1)
        self.update = nn.Conv3d(h, c, kernel_size=1)
        self.kernel: LatticeKernel = "conv3d"  # how the conv runs (CellularCube.use_kernel); not a weight
        nn.init.zeros_(self.update.weight)  # untrained MLP is a no-op (Growing NCA)
        nn.init.zeros_(self.update.bias)
        with torch.no_grad():
            self.perceive.weight[h:].zero_()  # the linear path starts silent ...
            self.perceive.bias[h:].zero_()
            if cfg.transport_init:  # ... or as transport along depth: dx = front − self
                channel = torch.arange(c)
                self.perceive.weight[h + channel, channel, 0, 1, 1] = 1.0
                self.perceive.weight[h + channel, channel, 1, 1, 1] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "conv3d":
            return self._cells_forward(x)
        if self.cfg.perception == "sobel":
            x = F.conv3d(x, self.sobel, padding=1, groups=self.cfg.channels)  # (B, 4C, D, H, W)
        h = self.perceive(x)  # (B, hidden + C, D, H, W)
        # split, not two slices: its backward is one cat, not two zero-filled full-size copies
        hidden, linear = h.split((self.cfg.hidden, h.shape[1] - self.cfg.hidden), dim=1)
        return self.update(F.relu(hidden)) + linear  # (B, C, D, H, W)

    def _cells_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` on the cells (B, D, H, W, C), a view of a channels-last state: the
        perception by `self.kernel`, the per-cell MLP as matmuls."""
        c = self.cfg
        cells = x.permute(0, 2, 3, 4, 1)
        if torch.is_autocast_enabled(x.device.type):  # cast the 8-channel cells, not the 3C or 27C copies of them
            cells = cells.to(torch.get_autocast_dtype(x.device.type))
        h = self._perceive_conv2d(cells) if self.kernel == "conv2d" else self._perceive_im2col(cells)
        hidden, linear = h.split((c.hidden, c.channels), dim=-1)
        dx = F.linear(F.relu(hidden), self.update.weight.view(c.channels, c.hidden), self.update.bias) + linear
        return dx.permute(0, 4, 1, 2, 3)  # (B, C, D, H, W), channels-last memory

    def _perceive_conv2d(self, cells: torch.Tensor) -> torch.Tensor:
        """Depth taps stacked into channels (B·D images of 3C channels), then a 3×3 conv2d."""
        b, d, h, w, c = cells.shape
        stacked = _DepthTaps.apply(cells)  # (B, D, H, W, 3C), depth-tap-major
        images = stacked.view(b * d, h, w, 3 * c).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
        weight = self.perceive.weight.permute(0, 2, 1, 3, 4).reshape(-1, 3 * c, 3, 3)  # (O, kd·C + c, kh, kw)
        out = F.conv2d(images, weight.contiguous(memory_format=torch.channels_last), self.perceive.bias, padding=1)
        return out.permute(0, 2, 3, 1).reshape(b, d, h, w, -1)

    def _perceive_im2col(self, cells: torch.Tensor) -> torch.Tensor:
        """All 27 taps side by side (B, D, H, W, 27C), then one matmul."""
        b, d, h, w, c = cells.shape
        padded = F.pad(cells, (0, 0, 1, 1, 1, 1, 1, 1))
        patches = torch.cat([padded[:, i : i + d, j : j + h, k : k + w] for i, j, k in product(range(3), repeat=3)], dim=-1)
        weight = self.perceive.weight.permute(0, 2, 3, 4, 1).reshape(-1, 27 * c)  # (O, tap·C + c)
        return F.linear(patches, weight, self.perceive.bias)


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
        if cfg.residual:  # start exactly at the identity baseline, then improve on it
            nn.init.zeros_(self.decoder.weight)
            nn.init.zeros_(self.decoder.bias)
        self.rule = UpdateRule(cfg)
        # Centring statistics from the training split; set by `set_centering`, saved with the weights.
        self.register_buffer("q_mean", torch.zeros(embed_dim))
        self.register_buffer("a_mean", torch.zeros(embed_dim))

    def use_kernel(self, kernel: LatticeKernel) -> "CellularCube":
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
        GPU fast path (cube.graph_step) captures or compiles. Returns (next state, dx)."""
        x, dx = self.update(x, inject, keep, fire)
        return x + dx, dx

    def run_lattice(
        self, front: torch.Tensor, steps: int | None = None, layer_mask: torch.Tensor | None = None,
        damage: tuple[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run T steps with `front` (B, k, H, W) clamped onto the front face.

        `layer_mask` (D,) scales each depth layer's update (1 = normal, 0 = frozen) and `damage`
        = (step, mask (D, H, W)) zeroes cells once; both exist for `cube analyze`.
        Returns the final state (B, C, D, H, W) and the last applied update.
        """
        c = self.cfg
        x, inject, keep = self.lattice_inputs(front)
        dx = torch.zeros_like(x)
        if steps is None:
            steps = c.steps
            if self.training and c.steps_jitter:
                steps += int(torch.randint(0, c.steps_jitter + 1, ()))
        for t in range(steps):
            x, dx = self.update(x, inject, keep, self.fire_mask(x))
            if layer_mask is not None:
                dx = dx * layer_mask.view(1, 1, -1, 1, 1)
            x = x + dx
            if damage is not None and t == damage[0]:
                x = x * (1 - damage[1].to(x.dtype))
        return x, dx

    def readout(self, q_centred: torch.Tensor, state: torch.Tensor, last_update: torch.Tensor) -> CubeOutput:
        """Final state → CubeOutput: the back face through the decoder (plus the question if residual)."""
        return self.decode(q_centred, state[:, : self.cfg.io_channels, -1], last_update)

    def decode(self, q_centred: torch.Tensor, back: torch.Tensor, last_update: torch.Tensor) -> CubeOutput:
        pred = self.decoder(back.flatten(1))  # back: (B, k, H, W)
        if self.cfg.residual:
            pred = pred + self.prepare(q_centred)
        return CubeOutput(pred, back, last_update)

    def forward(self, q_centred: torch.Tensor, **lattice_kwargs) -> CubeOutput:
        """(B, E) centred question → CubeOutput with the centred answer prediction."""
        front = self.encode_face(q_centred)
        if not self.cfg.lattice:  # ablation: the same adapters with nothing in between
            return self.decode(q_centred, front, front.new_zeros(()))
        state, dx = self.run_lattice(front, **lattice_kwargs)
        return self.readout(q_centred, state, dx)

    def predict(self, q: torch.Tensor, **lattice_kwargs) -> torch.Tensor:
        """Raw question embeddings (B, E) → centred answer predictions (B, E)."""
        return self(q - self.q_mean, **lattice_kwargs).pred


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
