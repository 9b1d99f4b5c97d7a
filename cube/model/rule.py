"""The one update rule every cell shares, and the kernels that compute its 3×3×3 conv."""

from __future__ import annotations

from itertools import product
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from cube.model.config import CubeConfig

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
        patches = torch.cat(
            [padded[:, i : i + d, j : j + h, k : k + w] for i, j, k in product(range(3), repeat=3)], dim=-1
        )
        weight = self.perceive.weight.permute(0, 2, 3, 4, 1).reshape(-1, 27 * c)  # (O, tap·C + c)
        return F.linear(patches, weight, self.perceive.bias)
