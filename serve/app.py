"""Ray Serve app: HTTP question → teacher embedding → cube → nearest answer in the run's corpus.

    POST /v1/answer  {"question": "..."}  →  {"answer": "...", "score": 0.83}
    GET  /healthz                          →  200 once the model is loaded

Two deployments, so the teacher (the heavy part) scales apart from the API:
`Encoder` batches questions through the teacher; `AnswerAPI` validates requests and runs the
cube. Start it with `cube serve --run RUN_DIR`, or `serve run serve.app:build_app run_dir=RUN_DIR`.

No `from __future__ import annotations` here: FastAPI must see the real request model types.
"""


from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, StrictStr, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from cube.answering import AnswerBank, answer_questions
from cube.checkpoint import load_checkpoint
from cube.config import from_dict, to_dict
from cube.rundir import RunDir
from cube.teacher import Teacher, TeacherConfig

api = FastAPI(title="cellular cube", description="Answers questions with a trained cube run.")

# Fractional CPUs: a replica takes 1 CPU by default, and two of them would fill a 2-core laptop.
REPLICA_CPUS = 0.25


class AnswerRequest(BaseModel):
    question: StrictStr

    @field_validator("question")
    @classmethod
    def not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("question must not be empty")
        return v


class AnswerResponse(BaseModel):
    answer: str
    score: float


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=32, max_queued_requests=256)
class Encoder:
    def __init__(self, teacher: dict[str, Any]) -> None:
        self.teacher = Teacher(from_dict(TeacherConfig, teacher))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def __call__(self, questions: list[str]) -> list[np.ndarray]:
        return list(self.teacher.embed(questions).vectors)


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=32, max_queued_requests=256)
@serve.ingress(api)
class AnswerAPI:
    def __init__(self, encoder: DeploymentHandle, run_dir: str) -> None:
        run = RunDir(run_dir)
        teacher, _ = run.teacher()
        self.model, self.checkpoint = load_checkpoint(run.model_dir, expected_teacher=teacher.identity())
        data = run.data()  # every distinct answer of the run's corpus (all splits): any known answer is findable
        first = ~data.frame["answer"].duplicated().to_numpy()
        self.bank = AnswerBank(data.frame["answer"][first].tolist(), data.a[first], self.model.a_mean)
        self.encoder = encoder
        self.run_dir = run_dir

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "run": self.run_dir, "bank_size": len(self.bank.texts),
                "teacher": self.checkpoint["teacher"]["name"]}

    @api.post("/v1/answer", response_model=AnswerResponse)
    async def answer(self, request: AnswerRequest) -> AnswerResponse:
        vector = await self.encoder.remote(request.question)
        best = answer_questions(self.model, self.bank, vector[None])[0]
        return AnswerResponse(answer=best.answer, score=best.score)


def build_app(args: dict[str, str]) -> serve.Application:
    """App builder for `serve run serve.app:build_app run_dir=RUN_DIR` and `serve build`."""
    if "run_dir" not in args:
        raise ValueError("pass run_dir=RUN_DIR (a folder written by `cube train`)")
    run = RunDir(args["run_dir"])
    run.require("model", "split.parquet", "teacher.json")
    teacher, _ = run.teacher()
    return AnswerAPI.bind(Encoder.bind(to_dict(teacher)), str(run.path.resolve()))
