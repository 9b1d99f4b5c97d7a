"""The vLLM embedding backend (`teacher.backend=vllm`): GPU only, from the `gpu` extra.

Written against current vLLM (0.13+): `LLM(model=..., runner="pooling")` with a `PoolerConfig`
that sets the same pooling and normalisation as the transformers backend, then `llm.embed`.
It cannot run on this project's build machines (no GPU; the wheel is too large to carry to the
lent GPU), so it is exercised by no test here; asking for it without a GPU or without vllm is
an error, never a silent switch to the transformers backend.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from cube.teachers.base import Embeddings, TeacherConfig, TeacherError, resolve_source


def check_vllm_available() -> None:
    """Raises TeacherError unless vllm is importable and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise TeacherError("teacher.backend=vllm needs vLLM: `pip install -e '.[gpu]'` on a CUDA machine "
                           "(or use teacher.backend=hf)")
    if not torch.cuda.is_available():
        raise TeacherError("teacher.backend=vllm needs a CUDA GPU and none is visible; use teacher.backend=hf")


class VLLMTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        check_vllm_available()
        if cfg.quantize != "none":
            raise TeacherError("teacher.quantize applies to the hf backend (bitsandbytes); with vLLM pass a "
                               "pre-quantised model folder as teacher.name instead")
        from vllm import LLM
        from vllm.config import PoolerConfig

        source = resolve_source(cfg.name)
        model = f"{source.path}/{source.gguf_file}" if source.gguf_file else source.path
        pooler = PoolerConfig(pooling_type="MEAN" if cfg.pooling == "mean" else "LAST", normalize=cfg.normalize)
        self.cfg = cfg
        self.llm = LLM(model=model, runner="pooling", pooler_config=pooler, dtype=cfg.dtype,
                       max_model_len=cfg.max_length, enforce_eager=False)
        self.tokenizer = self.llm.get_tokenizer()
        self.dim = int(self.llm.llm_engine.model_config.get_hidden_size())

    def embed(self, texts: list[str]) -> Embeddings:
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        outputs = self.llm.embed(texts, truncate_prompt_tokens=self.cfg.max_length, use_tqdm=False)
        vectors = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
        return Embeddings(vectors, np.asarray([n > self.cfg.max_length for n in lengths]))
