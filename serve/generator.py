"""Generator: the run's teacher answering in its own words, for /v1/compare.

Only a causal language model with a chat template can generate (smollm2, or any instruct model
given as the teacher). For any other teacher (minilm is a sentence encoder) the replica loads
nothing and every reply says why generation is unavailable: that is a field, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from cube.config import from_dict
from cube.teachers import TeacherConfig
from cube.teachers.generate import AnswerWriter, GeneratorConfig
from serve.settings import REPLICA_CPUS, DeploymentSettings

log = logging.getLogger("cube.serve")
ENCODERS = {
    "minilm": "minilm (all-MiniLM-L6-v2) is a sentence encoder, not a causal language model: it cannot generate"
}


def load_writer(teacher: TeacherConfig, max_new_tokens: int, device: str) -> tuple[AnswerWriter | None, str | None]:
    """(writer, None) for a teacher that can generate, else (None, why not, with the error that
    said so). The writer loads the teacher as the embedder does: its dtype and quantisation."""
    if teacher.name in ENCODERS:
        return None, ENCODERS[teacher.name]
    try:
        return AnswerWriter(GeneratorConfig(name=teacher.name, max_new_tokens=max_new_tokens), device, teacher), None
    except Exception as e:  # any failure to load is a reason shown in /v1/model and the log, not a dead replica
        return None, f"teacher {teacher.name!r} cannot generate here: {type(e).__name__}: {e}"


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": REPLICA_CPUS})
class Generator:
    def __init__(self, teacher: dict[str, Any], max_new_tokens: int, settings: dict[str, Any]) -> None:
        s = from_dict(DeploymentSettings, settings)
        torch.set_num_threads(s.torch_threads)
        self.teacher = from_dict(TeacherConfig, teacher)
        self.writer, self.reason = load_writer(self.teacher, max_new_tokens, s.device)
        if self.reason:
            log.warning("generation unavailable: %s", self.reason)
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

    async def status(self) -> dict[str, Any]:
        """Whether this replica can generate, and if not, why (shown in /v1/model)."""
        return {"available": self.writer is not None, "teacher": self.teacher.name, "reason": self.reason}

    async def generate(self, question: str) -> dict[str, Any]:
        if self.writer is None:
            return {"available": False, "teacher": self.teacher.name, "answer": None, "reason": self.reason, "ms": None}
        text, ms = await self._generate_batch(question)
        return {"available": True, "teacher": self.teacher.name, "answer": text, "reason": None, "ms": ms}
