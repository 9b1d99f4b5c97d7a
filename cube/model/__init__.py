"""The cellular cube: its config, its shared update rule and the lattice between two adapters."""

from cube.model.config import CubeConfig
from cube.model.cube import CellularCube, CubeOutput, LatticeStep, count_parameters, lattice_step
from cube.model.rule import KERNELS, LatticeKernel, UpdateRule

__all__ = ["KERNELS", "CellularCube", "CubeConfig", "CubeOutput", "LatticeKernel", "LatticeStep", "UpdateRule",
           "count_parameters", "lattice_step"]
