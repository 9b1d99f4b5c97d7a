"""The transformers backend (`teacher.backend=hf`): local files only, CPU or GPU, optional
bitsandbytes quantisation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cube.data.cache import cache_dir
from cube.teachers.base import Embeddings, ModelSource, TeacherConfig, TeacherError, resolve_source


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
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, **{k: v for k, v in kwargs.items() if k in ("local_files_only", "gguf_file")}
        )
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


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, E) hidden states, (B, L) mask → (B, E)."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    last = mask.sum(1).long() - 1  # right padding: index of the last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class HFTeacher:
    """A loaded teacher that turns texts into embeddings (hf backend)."""

    def __init__(self, cfg: TeacherConfig, device: str = "cpu") -> None:
        if cfg.backend != "hf":
            raise TeacherError("Teacher is the transformers backend; use cube.teachers.vllm for backend='vllm'")
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
