"""CubePredictor: question vectors → the cube's predicted answer embedding and the best answers
in the bank, dynamically batched; plus the identity baseline's answers and the lattice trace.

Torch work runs on one worker thread, off the replica's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import torch
from ray import serve

from cube.config import from_dict
from cube.data.bank import SearchConfig
from serve.batching import BusyGate
from serve.pipeline import Embedded, LoadedRun
from serve.settings import REPLICA_CPUS, DeploymentSettings

T = TypeVar("T")


@serve.deployment(name="CubePredictor", ray_actor_options={"num_cpus": REPLICA_CPUS})
class CubePredictor:
    def __init__(self, run_dir: str, answers: str | None, store_folder: str | None, settings: dict[str, Any],
                 search: dict[str, Any] | None = None) -> None:
        s = from_dict(DeploymentSettings, settings)
        torch.set_num_threads(s.torch_threads)
        self.loaded = LoadedRun(run_dir, answers, store_folder, device=s.device,
                                search=from_dict(SearchConfig, search or {}))
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="cube")
        self.gate = BusyGate()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live batch settings (the deployment's user_config): no restart needed."""
        self._answer_batch.set_max_batch_size(int(config["max_batch_size"]))
        self._answer_batch.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _answer_batch(self, items: list[tuple[np.ndarray, int]]) -> list[dict[str, Any]]:
        vectors = np.stack([v for v, _ in items])  # (B, E)
        with self.gate.busy():
            return await self._off_loop(self.loaded.answer, vectors, [k for _, k in items])

    async def answer(self, embedded: Embedded, top_k: int) -> dict[str, Any]:
        """The cube's top_k answers for what TeacherEmbedder.embed returned; concurrent calls
        share one batch (serve/batching.py).

        Raises:
            ModelMismatch: the vector comes from another teacher (a swap between runs is under way).
        """
        self.loaded.check(embedded.vector, embedded.teacher_key)
        await self.gate.wait()
        return await self._answer_batch((embedded.vector, top_k))

    async def identity(self, embedded: Embedded, top_k: int) -> list[dict[str, Any]]:
        self.loaded.check(embedded.vector, embedded.teacher_key)
        return await self._off_loop(self.loaded.identity, embedded.vector, top_k)

    async def trace(self, embedded: Embedded) -> dict[str, Any]:
        self.loaded.check(embedded.vector, embedded.teacher_key)
        return await self._off_loop(self.loaded.trace, embedded.vector)

    async def info(self) -> dict[str, Any]:
        return self.loaded.info()
