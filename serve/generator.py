"""Generator: text for /v1/generate and /v1/compare, from two sources.

- The run's answer writer (RUN/decoder/model, trained by `cube decoder`): text written from the
  cube's predicted answer embedding. Without one, /v1/generate answers 409 saying how to train it.
- The run's teacher answering in its own words. Only a causal language model with a chat template
  can (smollm2, or any instruct model given as the teacher). For any other teacher (minilm is a
  sentence encoder) every reply says why that is unavailable: a field, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve

from cube.config import from_dict
from cube.decoder.model import EmbeddingDecoder, load_decoder
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


def load_answer_writer(decoder_dir: str | None, device: str) -> tuple[EmbeddingDecoder | None, str | None]:
    """(the run's decoder, None), or (None, why there is none)."""
    if decoder_dir is None:
        return None, "the served run is at a URI: serve a local copy to generate from the cube"
    try:
        return load_decoder(decoder_dir, device), None
    except FileNotFoundError:
        return None, "the served run has no decoder: train one with `cube decoder --run RUN`, then redeploy"
    except Exception as e:  # shown in /v1/model and the 409's message, not a dead replica
        return None, f"the run's decoder did not load: {type(e).__name__}: {e}"


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": REPLICA_CPUS})
class Generator:
    def __init__(self, teacher: dict[str, Any], max_new_tokens: int, settings: dict[str, Any],
                 decoder_dir: str | None = None) -> None:
        s = from_dict(DeploymentSettings, settings)
        torch.set_num_threads(s.torch_threads)
        self.teacher = from_dict(TeacherConfig, teacher)
        self.writer, self.reason = load_writer(self.teacher, max_new_tokens, s.device)
        if self.reason:
            log.warning("generation unavailable: %s", self.reason)
        self.decoder, self.decoder_reason = load_answer_writer(decoder_dir, s.device)
        if self.decoder_reason:
            log.warning("generation from the cube unavailable: %s", self.decoder_reason)
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
        return {"available": self.writer is not None, "teacher": self.teacher.name, "reason": self.reason,
                "decoder": {"available": self.decoder is not None, "reason": self.decoder_reason,
                            "lm": self.decoder.cfg.lm if self.decoder is not None else None}}

    async def write(self, centred: np.ndarray, max_new_tokens: int) -> dict[str, Any]:
        """Text written by the run's decoder from the cube's (centred) predicted answer embedding."""
        if self.decoder is None:
            return {"available": False, "text": None, "reason": self.decoder_reason, "ms": None, "tokens": 0}
        decoder = self.decoder

        def run() -> tuple[list[str], int]:
            return decoder.generate(torch.as_tensor(centred).view(1, -1), max_new_tokens, centred=True)

        t0 = time.perf_counter()
        texts, tokens = await asyncio.get_running_loop().run_in_executor(self.worker, run)
        return {"available": True, "text": texts[0], "reason": None, "ms": (time.perf_counter() - t0) * 1e3,
                "tokens": tokens}

    async def generate(self, question: str) -> dict[str, Any]:
        if self.writer is None:
            return {"available": False, "teacher": self.teacher.name, "answer": None, "reason": self.reason, "ms": None}
        text, ms = await self._generate_batch(question)
        return {"available": True, "teacher": self.teacher.name, "answer": text, "reason": None, "ms": ms}
