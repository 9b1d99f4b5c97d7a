"""Teacher-written answers: an instruct model answers question-only data with its chat template.

This is how the original plan built its dialogue dataset (a teacher LLM writes the answers).
Decoding is greedy by default and bounded in length, so a rerun reproduces the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cube.teachers.base import TeacherConfig, TeacherError
from cube.teachers.hf import load_hf


@dataclass(frozen=True)
class GeneratorConfig:
    name: str = "smollm2"  # any chat model: bundled name, Hugging Face id or local folder
    max_new_tokens: int = 80
    temperature: float = 0.0  # 0 = greedy
    system_prompt: str = "You are a knowledgeable assistant. Answer the question in one or two complete sentences."

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 1024:
            raise ValueError(f"generator.max_new_tokens must be in [1, 1024], got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"generator.temperature must be >= 0, got {self.temperature}")


class AnswerWriter:
    """A chat model that answers questions. `source` says how to load it (dtype, quantisation):
    the serving teacher's own config, so an 8B teacher is not loaded again in fp32; by default
    the generator's name with the defaults. `loaded` is a (model, tokenizer) already in memory
    (the answer writer's LM), used instead of loading it again."""

    def __init__(self, cfg: GeneratorConfig, device: str = "cpu", source: TeacherConfig | None = None,
                 loaded: tuple[Any, Any] | None = None) -> None:
        self.cfg = cfg
        self.model, self.tokenizer = loaded or load_hf(source or TeacherConfig(name=cfg.name), device, causal_lm=True)
        if not getattr(self.tokenizer, "chat_template", None):
            raise TeacherError(f"generator {cfg.name!r} has no chat template; use an instruct/chat model")
        self.tokenizer.padding_side = "left"  # decoder-only batches must end at the prompt's last token

    def _prompt(self, question: str) -> str:
        messages = [{"role": "system", "content": self.cfg.system_prompt}, {"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def answer(self, questions: list[str]) -> list[str]:
        batch = self.tokenizer([self._prompt(q) for q in questions], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(self.model.device)
        sampling = (
            {"do_sample": True, "temperature": self.cfg.temperature}
            if self.cfg.temperature > 0
            else {"do_sample": False}
        )
        out = self.model.generate(
            **batch, max_new_tokens=self.cfg.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
        )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [t.strip() for t in texts]
