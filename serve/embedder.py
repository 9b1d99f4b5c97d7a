"""TeacherEmbedder: texts → teacher embeddings, dynamically batched.

The teacher is loaded with `cube.teachers.load_teacher`, the same function training uses, so any
backend (transformers on CPU or GPU, vLLM) serves. The forward pass runs on one worker thread,
off the replica's event loop, so requests keep arriving (and batches keep filling) meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray import serve

from cube.config import from_dict
from cube.teachers import TeacherConfig, TeacherError, load_teacher
from serve.batching import BusyGate
from serve.pipeline import Embedded, teacher_key
from serve.settings import REPLICA_CPUS, DeploymentSettings


@serve.deployment(name="TeacherEmbedder", ray_actor_options={"num_cpus": REPLICA_CPUS})
class TeacherEmbedder:
    def __init__(self, teacher: dict[str, Any], settings: dict[str, Any], dim: int | None = None) -> None:
        s = from_dict(DeploymentSettings, settings)
        torch.set_num_threads(s.torch_threads)
        self.cfg = from_dict(TeacherConfig, teacher)
        self.teacher = load_teacher(self.cfg, s.device)
        if dim is not None and self.teacher.dim != dim:  # a run trained on embeddings the user brought
            raise TeacherError(f"teacher {self.cfg.name!r} makes {self.teacher.dim}-D vectors, but the run was trained "
                               f"on {dim}-D ones: it cannot embed new questions for it; train the run with --set "
                               "teacher=<the model whose space its embeddings are in>")
        self.key = teacher_key(self.cfg.identity())
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="teacher")  # one forward pass at a time
        self.gate = BusyGate()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live batch settings (the deployment's user_config): no restart needed."""
        self._embed_batch.set_max_batch_size(int(config["max_batch_size"]))
        self._embed_batch.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    async def embed(self, text: str) -> Embedded:
        """One text per call; concurrent calls share one teacher batch (serve/batching.py)."""
        await self.gate.wait()
        return await self._embed_batch(text)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _embed_batch(self, texts: list[str]) -> list[Embedded]:
        with self.gate.busy():
            t0 = time.perf_counter()
            out = await asyncio.get_running_loop().run_in_executor(self.worker, self.teacher.embed, texts)
            ms = (time.perf_counter() - t0) * 1e3
        return [Embedded(v, self.key, ms, len(texts)) for v in out.vectors]

    async def info(self) -> dict[str, Any]:
        return {"teacher": self.cfg.identity(), "key": self.key}
