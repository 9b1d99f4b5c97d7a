"""The cube's shape and rule settings: what `cube.*` keys in a config file fill in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    lattice: bool = (
        True  # False: the decoder reads the front face directly (the ablation that shows what the lattice adds)
    )
    # A second decoder reads the front face: the prediction is a direct map of the question plus
    # what the lattice adds at the back face. The lattice then refines rather than carries (with
    # adapter=mlp, the direct path is an MLP of io_channels*width*height hidden units).
    skip: bool = False

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
            raise ValueError(
                "transport_init needs perception='learned' (fixed Sobel filters have no front tap); set "
                "transport_init=false"
            )

    @property
    def face(self) -> int:
        return self.width * self.height
