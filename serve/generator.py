"""Generator: the run's teacher answering in its own words, for /v1/compare.

Only a causal language model with a chat template can generate (smollm2, or any instruct model
given as the teacher). For any other teacher (minilm is a sentence encoder) the replica loads
nothing and every reply says why generation is unavailable: that is a field, not an error.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from cube.config import from_dict
from cube.teachers import TeacherConfig, TeacherError
from cube.teachers.generate import AnswerWriter, GeneratorConfig
from serve.settings import REPLICA_CPUS, DeploymentSettings

ENCODERS = {
    "minilm": "minilm (all-MiniLM-L6-v2) is a sentence encoder, not a causal language model: it cannot generate"
}


def load_writer(teacher: TeacherConfig, max_new_tokens: int, device: str) -> tuple[AnswerWriter | None, str | None]:
    """(writer, None) for a teacher that can generate, else (None, why not)."""
    if teacher.name in ENCODERS:
        return None, ENCODERS[teacher.name]
    try:
        return AnswerWriter(GeneratorConfig(name=teacher.name, max_new_tokens=max_new_tokens), device), None
    except (TeacherError, ValueError, OSError) as e:
        return None, f"teacher {teacher.name!r} cannot generate here: {e}"


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": REPLICA_CPUS})
class Generator:
    def __init__(self, teacher: dict[str, Any], max_new_tokens: int, settings: dict[str, Any]) -> None:
        s = from_dict(DeploymentSettings, settings)
        torch.set_num_threads(s.torch_threads)
        self.teacher = from_dict(TeacherConfig, teacher)
        self.writer, self.reason = load_writer(self.teacher, max_new_tokens, s.device)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="generate")

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._generate_batch.set_max_batch_size(int(config["max_batch_size"]))
        self._generate_batch.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)
    async def _generate_batch(self, questions: list[str]) -> list[tuple[str, float]]:
        assert self.writer is not None
        t0 = time.perf_counter()
        texts = await asyncio.get_running_loop().run_in_executor(self.worker, self.writer.answer, questions)
        ms = (time.perf_counter() - t0) * 1e3
        return [(t, ms) for t in texts]

    async def generate(self, question: str) -> dict[str, Any]:
        if self.writer is None:
            return {"available": False, "teacher": self.teacher.name, "answer": None, "reason": self.reason, "ms": None}
        text, ms = await self._generate_batch(question)
        return {"available": True, "teacher": self.teacher.name, "answer": text, "reason": None, "ms": ms}
