"""Typed serving settings: how each deployment runs and what the API accepts. No Ray here.

Values come from the defaults below, then an optional YAML file (`cube serve --config FILE`,
or `config: FILE` in the Serve app's args), then inline overrides (`settings:` in the app's
args, or `cube serve --set limits.max_top_k=50`). Unknown keys and wrong types are errors that
name the key (cube.config.from_dict).

    api:        # the HTTP ingress (AnswerAPI): validation, composition, timeouts
    embedder:   # the teacher (TeacherEmbedder), with dynamic batching
    predictor:  # the cube and the answer bank (CubePredictor), with dynamic batching
    generator:  # the teacher's own generated answer for /v1/compare (Generator)
    limits:     # request limits and the end-to-end timeout
    search:     # exact search of the answer bank, or a faiss IVF index (cube/data/bank.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cube.config import apply_overrides, from_dict, to_dict
from cube.data.bank import SearchConfig

# A whole CPU a replica, sized for a real node. On a laptop, configs/serve_laptop.yaml gives each
# a quarter (the four deployments in one CPU); `cube demo` and the tests use it.
REPLICA_CPUS = 1.0


@dataclass(frozen=True)
class DeploymentSettings:
    """How one deployment runs. Batch settings apply to the batched ones (embedder, predictor)."""

    num_replicas: int = 1
    num_cpus: float = REPLICA_CPUS
    num_gpus: float = 0.0  # > 0 puts the replica's model on CUDA
    max_ongoing_requests: int = 64  # per replica; at least max_batch_size, or batches never fill
    max_queued_requests: int = 256  # per caller; beyond it a request is refused at once with 503
    max_batch_size: int = 32
    # How long a batch waits to fill. 0: it takes what queued while the previous batch ran, which
    # batches under load and adds no wait to a lone request.
    batch_wait_timeout_s: float = 0.0
    torch_threads: int = 1  # per replica; one thread per replica keeps replicas from fighting over cores

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.num_cpus + self.num_gpus == 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0 and not both 0, got {self.num_cpus}, {self.num_gpus}")
        if self.max_ongoing_requests < 1 or self.max_queued_requests < 1:
            raise ValueError("max_ongoing_requests and max_queued_requests must be >= 1, got "
                             f"{self.max_ongoing_requests}, {self.max_queued_requests}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got "
                             f"{self.max_batch_size}, {self.batch_wait_timeout_s}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options`."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {"num_replicas": self.num_replicas, "ray_actor_options": actor,
                "max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests}


@dataclass(frozen=True)
class Limits:
    max_question_chars: int = 2000  # longer questions answer 413, naming the limit
    max_body_bytes: int = 65536  # request bodies over this answer 413
    max_top_k: int = 20
    max_embed_texts: int = 64  # texts per /v1/embed request
    request_timeout_s: float = 60.0  # end to end inside the API; past it a request answers 504
    generation_max_new_tokens: int = 64  # written answers: /v1/generate's cap, and /v1/compare's length

    def __post_init__(self) -> None:
        for key in (
            "max_question_chars",
            "max_body_bytes",
            "max_top_k",
            "max_embed_texts",
            "generation_max_new_tokens",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"limits.{key} must be >= 1, got {getattr(self, key)}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"limits.request_timeout_s must be > 0, got {self.request_timeout_s}")


def _api_defaults() -> DeploymentSettings:
    return DeploymentSettings(max_ongoing_requests=128, max_queued_requests=256)


def _generator_defaults() -> DeploymentSettings:
    # Generation takes seconds per question on a CPU: a short queue, refused beyond it.
    return DeploymentSettings(max_ongoing_requests=2, max_queued_requests=8, max_batch_size=1)


@dataclass(frozen=True)
class ServeConfig:
    api: DeploymentSettings = field(default_factory=_api_defaults)
    embedder: DeploymentSettings = field(default_factory=DeploymentSettings)
    predictor: DeploymentSettings = field(default_factory=DeploymentSettings)
    generator: DeploymentSettings = field(default_factory=_generator_defaults)
    limits: Limits = field(default_factory=Limits)
    search: SearchConfig = field(default_factory=SearchConfig)  # exact, or an IVF index for big banks

    def __post_init__(self) -> None:
        for name in ("embedder", "predictor"):
            d = getattr(self, name)
            if d.max_ongoing_requests < d.max_batch_size:
                raise ValueError(f"{name}.max_ongoing_requests ({d.max_ongoing_requests}) < {name}.max_batch_size "
                                 f"({d.max_batch_size}): a batch could never fill")


# Deployment name → its section above; the Kubernetes RayService manifest names the same ones.
DEPLOYMENTS = {
    "AnswerAPI": "api",
    "TeacherEmbedder": "embedder",
    "CubePredictor": "predictor",
    "Generator": "generator",
}


def load_settings(path: str | Path | None = None, inline: dict[str, Any] | None = None,
                  overrides: list[str] | None = None) -> ServeConfig:
    """Defaults, then the YAML file at `path`, then `inline` (nested, merged per section), then
    `key=value` overrides.

    Raises:
        ValueError: an unknown key or a wrong type, naming it; a file that is not a mapping.
        FileNotFoundError: `path` does not exist.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"serve settings file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: serve settings must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for section, values in (inline or {}).items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    data = apply_overrides(data, ServeConfig, overrides or [])
    return from_dict(ServeConfig, _with_defaults(data))


def _with_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A partial section keeps the section's own defaults (the generator's short queue, say)
    for the keys it leaves out, rather than the generic deployment defaults."""
    base = to_dict(ServeConfig())
    out = dict(data)
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(base.get(section), dict):
            out[section] = {**base[section], **values}
    return out

