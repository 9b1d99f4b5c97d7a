"""Teacher language models: text → one embedding per text (cube.teachers.base has the shared
parts, hf.py the transformers backend, vllm.py the vLLM one, generate.py chat answers)."""

from __future__ import annotations

from cube.teachers.base import Embeddings, Teacher, TeacherConfig, TeacherError, resolve_source
from cube.teachers.hf import HFTeacher, load_hf

__all__ = ["Embeddings", "HFTeacher", "Teacher", "TeacherConfig", "TeacherError", "load_hf", "load_teacher",
           "resolve_source"]


def load_teacher(cfg: TeacherConfig, device: str = "cpu") -> Teacher:
    """The teacher for `cfg.backend`; vllm is imported only when asked for.

    Raises:
        TeacherError: the backend cannot run here (no GPU, vllm missing) or the model does not load.
    """
    if cfg.backend == "vllm":
        from cube.teachers.vllm import VLLMTeacher

        return VLLMTeacher(cfg)
    return HFTeacher(cfg, device)
