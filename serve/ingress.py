"""AnswerAPI: the HTTP ingress. It validates requests (serve/http.py), then composes the model
deployments through their handles: TeacherEmbedder → CubePredictor (and the Generator for
/v1/compare). It holds no model, so it stays responsive while the models work.

Faults and load, as a client sees them:
- a model replica that dies mid-request is retried (another replica, or its replacement, takes it);
- a full queue anywhere answers 503 at once (Serve's BackPressureError), with Retry-After;
- past limits.request_timeout_s a request answers 504, and its downstream calls are cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from cube.config import from_dict
from serve.http import ServiceError, build_api
from serve.pipeline import Embedded, ModelMismatch
from serve.settings import REPLICA_CPUS, Limits

T = TypeVar("T")
RETRIES = 3  # attempts per downstream call when a replica dies under it


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


@serve.deployment(name="AnswerAPI", ray_actor_options={"num_cpus": REPLICA_CPUS})
@serve.ingress()
class AnswerAPI:
    def __init__(self, embedder: DeploymentHandle, predictor: DeploymentHandle, generator: DeploymentHandle,
                 limits: dict[str, Any]) -> None:
        self.embedder, self.predictor, self.generator = embedder, predictor, generator
        self.limits = from_dict(Limits, limits)
        self._methods: dict[tuple[int, str], DeploymentHandle] = {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this once the constructor is done: the request models take our limits."""
        return build_api(self, self.limits)

    # ---------------------------------------------------------------- plumbing

    async def _call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        """One downstream call, retried when the replica that took it dies (the router then
        picks a live replica, or waits for the replacement)."""
        key = (id(handle), method)
        if key not in self._methods:  # a method handle is an options() copy: make it once
            self._methods[key] = getattr(handle, method)
        for attempt in range(RETRIES):
            try:
                return await self._methods[key].remote(*args)
            except (RayActorError, ActorUnavailableError) as e:
                if attempt == RETRIES - 1:
                    raise ServiceError(
                        503, f"a model replica failed ({type(e).__name__}); retry", retry_after_s=1
                    ) from e
                await asyncio.sleep(0.05 * 2**attempt)
            except BackPressureError as e:
                raise ServiceError(503, f"overloaded: {e.message}", retry_after_s=1) from e
            except DeploymentUnavailableError as e:
                raise ServiceError(503, f"a model deployment is unavailable: {e.message}", retry_after_s=5) from e
            except ModelMismatch as e:
                raise ServiceError(503, str(e), retry_after_s=1) from e
        raise AssertionError("unreachable")

    async def _within_deadline(self, work: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(work, timeout=self.limits.request_timeout_s)
        except asyncio.TimeoutError as e:
            raise ServiceError(504, f"the request took longer than limits.request_timeout_s = "
                                    f"{self.limits.request_timeout_s:g} s") from e

    async def _embed(self, text: str) -> Embedded:
        return await self._call(self.embedder, "embed", text)

    # ---------------------------------------------------------------- the service (serve/http.py)

    async def health(self) -> dict[str, Any]:
        try:
            info = await asyncio.wait_for(self._call(self.predictor, "info"), timeout=10)
            await asyncio.wait_for(self._call(self.embedder, "info"), timeout=10)
        except (asyncio.TimeoutError, ServiceError) as e:
            raise ServiceError(503, f"not ready: the models are still loading ({e})", retry_after_s=5) from e
        return {"status": "ok", "run": info["run_dir"], "model_version": info["model_version"],
                "bank_size": info["bank_size"], "teacher": info["teacher"]["name"]}

    async def model(self) -> dict[str, Any]:
        info, generation = await self._within_deadline(asyncio.gather(
            self._call(self.predictor, "info"), self._call(self.generator, "status")))
        return {**info, "generation": generation, "limits": vars(self.limits)}

    async def answer(self, question: str, top_k: int) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            embedded = await self._embed(question)
            embed_ms = ms_since(t0)
            result = await self._call(self.predictor, "answer", embedded, top_k)
            best = result["answers"][0]
            timings = {"embed": embed_ms, "teacher": embedded.ms, "cube": result["timings"]["cube"],
                       "search": result["timings"]["search"], "total": ms_since(t0)}
            return {"answer": best["answer"], "score": best["score"], "top_k": top_k, "answers": result["answers"],
                    "model_version": result["model_version"], "timings_ms": timings,
                    "batch_sizes": {"teacher": embedded.batch_size, "cube": result["batch_size"]}}

        return await self._within_deadline(run())

    async def compare(self, question: str) -> dict[str, Any]:
        async def timed(work: Awaitable[T]) -> tuple[T, float]:
            t0 = time.perf_counter()
            return await work, ms_since(t0)

        async def generated() -> dict[str, Any]:
            try:
                return await self._call(self.generator, "generate", question)
            except ServiceError as e:  # a busy generator must not cost the cube's answer
                return {"available": False, "teacher": None, "answer": None, "reason": e.message, "ms": None}

        async def written(vector: Any, ms: float) -> dict[str, Any]:
            try:
                out = await self._call(self.generator, "write", vector, self.limits.generation_max_new_tokens)
            except ServiceError as e:
                return {"available": False, "answer": None, "reason": e.message, "ms": None}
            return {"available": out["available"], "answer": out["text"], "reason": out["reason"],
                    "ms": ms + out["ms"] if out["ms"] is not None else None}

        async def run() -> dict[str, Any]:
            teacher = asyncio.ensure_future(generated())
            try:
                embedded, embed_ms = await timed(self._embed(question))
                (cube, cube_ms), (identity, identity_ms) = await asyncio.gather(
                    timed(self._call(self.predictor, "answer", embedded, 1)),
                    timed(self._call(self.predictor, "identity", embedded, 1)))
                return {"question": question, "model_version": cube["model_version"],
                        "cube": {**cube["answers"][0], "ms": embed_ms + cube_ms},
                        "identity": {**identity[0], "ms": embed_ms + identity_ms},
                        "cube_written": await written(cube["vector"], embed_ms + cube_ms),
                        "teacher": await teacher, "timings_ms": {"embed": embed_ms}}
            finally:  # a timeout (or a failure) cancels the generation too, instead of leaving it running
                if not teacher.done():
                    teacher.cancel()

        return await self._within_deadline(run())

    async def generate(self, question: str, max_new_tokens: int) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            t0 = time.perf_counter()
            embedded = await self._embed(question)
            embed_ms = ms_since(t0)
            t1 = time.perf_counter()
            result = await self._call(self.predictor, "answer", embedded, 1)
            cube_ms = ms_since(t1)
            out = await self._call(self.generator, "write", result["vector"], max_new_tokens)
            if not out["available"]:
                raise ServiceError(409, out["reason"])
            best = result["answers"][0]
            return {"question": question, "text": out["text"], "tokens": out["tokens"],
                    "nearest": {"answer": best["answer"], "score": best["score"]},
                    "model_version": result["model_version"],
                    "timings_ms": {"embed": embed_ms, "cube": cube_ms, "generate": out["ms"], "total": ms_since(t0)}}

        return await self._within_deadline(run())

    async def embed(self, texts: list[str]) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            out = await asyncio.gather(*(self._embed(t) for t in texts))
            return {"dim": int(out[0].vector.shape[0]), "vectors": [e.vector.tolist() for e in out]}

        return await self._within_deadline(run())

    async def predict(self, question: str) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            result = await self._call(self.predictor, "answer", await self._embed(question), 1)
            vector = result["vector"]
            return {"dim": int(vector.shape[0]), "vector": vector.tolist(), "model_version": result["model_version"],
                    "space": "centred: the training answers' mean subtracted, as the bank is searched"}

        return await self._within_deadline(run())

    async def trace(self, question: str) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            return {"question": question, **await self._call(self.predictor, "trace", await self._embed(question))}

        return await self._within_deadline(run())
