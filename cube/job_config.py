"""The typed config of each job: what `--config` YAML files and `--set key=value` fill in.

They live here, in an importable Ray-free module, and never in an entrypoint: a module run as
`python -m jobs.<verb>` is `__main__`, and Ray would pickle anything defined there by value,
so a worker resolving the dataclasses' string annotations would find none of their types.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from cube.data.bank import SearchConfig
from cube.data.qa import DataConfig
from cube.decoder.model import DecoderConfig
from cube.eval.baselines import parse_baselines
from cube.model import CubeConfig
from cube.teachers.base import TeacherConfig
from cube.teachers.generate import GeneratorConfig
from cube.train.losses import LossConfig
from cube.train.optim import OptimConfig


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
    store_dtype: Literal["float32", "float16"] = "float32"  # the embedding store's vectors; float16 halves its disk
    # Ray Data read tasks at once over the input; 0 = one per four of the cluster's CPUs. Each
    # decodes a row group at a time: up to a GB for 64k rows of 4096-D vectors.
    read_concurrency: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.batch_size < 1:
            raise ValueError(f"concurrency and batch_size must be >= 1, got {self.concurrency}, {self.batch_size}")
        if self.num_gpus < 0 or self.cpus_per_actor <= 0:
            raise ValueError(f"need num_gpus >= 0 and cpus_per_actor > 0, got {self.num_gpus}, {self.cpus_per_actor}")
        if self.store_dtype not in ("float32", "float16"):
            raise ValueError(f"store_dtype must be float32 or float16, got {self.store_dtype!r}")
        if self.read_concurrency < 0:
            raise ValueError(f"read_concurrency must be >= 0 (0 = auto), got {self.read_concurrency}")
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
    # How Ray places the workers: PACK fills a node first (fast gloo/NCCL within a node);
    # SPREAD puts them on different nodes where it can (a node lost costs fewer workers).
    placement: str = "PACK"
    max_failures: int = 1  # worker-group restarts from the last checkpoint before giving up
    # Seconds to wait for the cluster to grow when it cannot hold the workers now. 0 = fail at
    # once, naming what was asked and what exists: right for a laptop or a fixed cluster. Set it
    # on an autoscaling cluster (`ray up`, KubeRay), where nodes join on demand.
    wait_for_resources_s: float = 0.0
    seed: int = 0  # model init and shuffling (the split has its own seed: data.seed)
    baseline_seeds: int = 3  # the stochastic baselines (the MLPs) are the mean of this many fits
    baselines: str = "all"  # which baselines to fit: all, or a comma list (identity,ridge: each raw and centred)
    baseline_threads: int = 0  # torch threads while the MLP baselines train on a CPU; 0 = torch's default
    # Validation each epoch scores this many of the validation questions (a seeded sample when there
    # are more), always against the whole validation pool; 0 = all of them.
    val_questions: int = 5_000
    # The held-out report scores this many test questions (a seeded sample when there are more),
    # always against the whole test pool; 0 = all. Ranking is exact, in blocks.
    eval_questions: int = 20_000
    bank_dtype: Literal["float32", "float16"] = "float32"  # the served answer bank's vectors (RUN/bank)
    # An approximate index built once beside the bank (ivf, for banks of about a million answers,
    # where exact search costs hundreds of ms a batch); Serve's `search.kind=ivf` loads it. Its
    # `probes` are a query-time setting: training ignores them, Serve's `search.probes` decides.
    bank_index: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if self.baseline_seeds < 1:
            raise ValueError(f"baseline_seeds must be >= 1, got {self.baseline_seeds}")
        parse_baselines(self.baselines)
        if self.val_questions < 0 or self.eval_questions < 0 or self.baseline_threads < 0:
            raise ValueError("val_questions, eval_questions and baseline_threads must be >= 0")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.wait_for_resources_s < 0:
            raise ValueError(f"wait_for_resources_s must be >= 0, got {self.wait_for_resources_s}")
        if self.placement not in ("PACK", "SPREAD"):
            raise ValueError(f"placement must be PACK or SPREAD, got {self.placement!r}")
        if self.optim.precision == "fp16" and not self.use_gpu:
            raise ValueError("optim.precision=fp16 needs use_gpu=true; use bf16 on CPU")


@dataclass(frozen=True)
class TuneConfig:
    """How a sweep runs; what each trial trains is a TrainConfig (`--config`, `--set`) with the
    search space's draws applied on top."""

    trials: int = 40
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs/GPUs hold
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractional: 0.25 packs four trials on a GPU
    workers_per_trial: int = 0  # 0 = each trial trains in its own process; N = a Ray Train run of N workers
    scheduler: Literal["asha", "fifo"] = "asha"  # ASHA stops weak trials early on validation MRR
    search: Literal["tpe", "random"] = "tpe"  # Optuna's TPE, or random search
    grace_period: int = 2  # epochs every trial gets before ASHA may stop it
    reduction_factor: int = 3  # ASHA keeps the best 1/reduction_factor at each rung
    robustness_seeds: int = 3  # the winner retrained with this many seeds (0 = skip)
    max_failures: int = 1  # retries of a trial that crashed (e.g. its node went away), from its checkpoint
    seed: int = 0  # the searcher's seed

    def __post_init__(self) -> None:
        if self.trials < 1 or self.max_concurrent < 0:
            raise ValueError(f"need trials >= 1 and max_concurrent >= 0, got {self.trials}, {self.max_concurrent}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0 or self.workers_per_trial < 0:
            raise ValueError("need cpus_per_trial > 0, gpus_per_trial >= 0 and workers_per_trial >= 0")
        if self.workers_per_trial and self.gpus_per_trial not in (0.0, 1.0):
            raise ValueError(
                "with workers_per_trial, each Ray Train worker takes a whole GPU: use gpus_per_trial 0 or 1"
            )
        if self.scheduler not in ("asha", "fifo") or self.search not in ("tpe", "random"):
            raise ValueError(
                f"scheduler must be asha|fifo and search tpe|random, got {self.scheduler!r}, {self.search!r}"
            )
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ValueError(
                f"need grace_period >= 1 and reduction_factor >= 2, got {self.grace_period}, {self.reduction_factor}"
            )
        if self.robustness_seeds < 0 or self.max_failures < 0:
            raise ValueError("robustness_seeds and max_failures must be >= 0")


@dataclass(frozen=True)
class DecoderJobConfig:
    """`cube decoder`: a run's answer writer, trained by reconstruction (cube/decoder/model.py)."""

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    epochs: int = 3
    batch_size: int = 16  # answers per worker per step
    lr: float = 1e-3  # AdamW, linear warm-up then cosine decay
    warmup_steps: int = 20
    weight_decay: float = 0.0
    workers: int = 2  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    max_failures: int = 1  # worker-group restarts from the last checkpoint
    seed: int = 0
    max_answers: int = 0  # train on this many training pairs (the first of the split); 0 = all
    val_answers: int = 64  # validation answers whose loss is measured after every epoch
    threads: int = 0  # torch threads per worker; 0 = torch's default
    # RUN/decoder/model: the epoch of lowest validation loss, or the last (a small LM trained from
    # scratch overfits its text while it still learns to use the embedding)
    keep: Literal["best", "last"] = "best"

    def __post_init__(self) -> None:
        if self.keep not in ("best", "last"):
            raise ValueError(f"keep must be best or last, got {self.keep!r}")
        for key in ("epochs", "batch_size", "workers", "val_answers"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_answers < 0 or self.threads < 0:
            raise ValueError("lr must be > 0; warmup_steps, max_answers and threads must be >= 0")
