"""The typed config of each job: what `--config` YAML files and `--set key=value` fill in.

They live here, in an importable Ray-free module, and never in an entrypoint: a module run as
`python -m jobs.<verb>` is `__main__`, and Ray would pickle anything defined there by value,
so a worker resolving the dataclasses' string annotations would find none of their types.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from cube.data import DataConfig
from cube.generate import GeneratorConfig
from cube.losses import LossConfig
from cube.model import CubeConfig
from cube.teacher import TeacherConfig
from cube.training import OptimConfig


@dataclass(frozen=True)
class PipelineOptions:
    """How the Ray Data embedding stages run (not what they compute)."""

    concurrency: int = 1  # teacher actors in the pool
    batch_size: int = 64  # texts per teacher call
    num_gpus: float = 0.0  # per actor; > 0 runs the teacher on CUDA
    cpus_per_actor: float = 1.0  # CPUs each actor reserves from Ray
    # torch threads per actor; 0 = auto: the node's cores shared between the actors, never fewer
    # than the CPUs reserved. Embedding runs before training, so nothing else competes for the
    # cores, and reserving only 1 CPU leaves Ray Data's own stages room (a Parquet listing needs
    # a whole free CPU, see check_room_for_listing). On 2 cores, 2 threads embed 1.7x faster than 1.
    threads_per_actor: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ValueError(f"concurrency and batch_size must be >= 1, got {self.concurrency}, {self.batch_size}")
        if self.num_gpus < 0 or self.cpus_per_actor <= 0:
            raise ValueError(f"need num_gpus >= 0 and cpus_per_actor > 0, got {self.num_gpus}, {self.cpus_per_actor}")
        if self.threads_per_actor < 0:
            raise ValueError(f"threads_per_actor must be >= 0 (0 = auto), got {self.threads_per_actor}")

    def threads(self, node_cpus: int | None = None) -> int:
        """Torch threads for one actor on a node with `node_cpus` cores (default: this one)."""
        if self.threads_per_actor:
            return self.threads_per_actor
        cores = node_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        shared = cores // self.concurrency
        return max(math.ceil(self.cpus_per_actor), shared)


@dataclass(frozen=True)
class EmbedConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    generate_answers: bool = False


@dataclass(frozen=True)
class TrainConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)  # the embedding stage
    cube: CubeConfig = field(default_factory=CubeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False  # one GPU per worker, NCCL
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    # Seconds to wait for the cluster to grow when it cannot hold the workers now. 0 = fail at
    # once, naming what was asked and what exists: right for a laptop or a fixed cluster. Set it
    # on an autoscaling cluster (`ray up`, KubeRay), where nodes join on demand.
    wait_for_resources_s: float = 0.0
    seed: int = 0  # model init and shuffling (the split has its own seed: data.seed)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.wait_for_resources_s < 0:
            raise ValueError(f"wait_for_resources_s must be >= 0, got {self.wait_for_resources_s}")
        if self.optim.precision == "fp16" and not self.use_gpu:
            raise ValueError("optim.precision=fp16 needs use_gpu=true; use bf16 on CPU")
