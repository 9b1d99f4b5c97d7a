"""The HTTP surface of the app: request models, limits, error bodies, routes. No Ray here: the
routes call a `Service` (the AnswerAPI deployment), which does the work.

Every bad request is a 4xx with a message that says what to change:
    400  the body is not valid JSON
    413  the body is over limits.max_body_bytes
    409  /v1/generate on a run without a decoder (`cube decoder --run RUN` trains one)
    415  the Content-Type is not application/json
    422  a field is missing, of the wrong type, empty, too long (the limit is named) or out of range
The service answers 503 when it is overloaded or a model is not ready, and 504 past the
request timeout.
"""

# No `from __future__ import annotations`: FastAPI and pydantic must see the real types of the
# request models, which are built inside build_api from the configured limits.

import json
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import AfterValidator, BaseModel, Field, StrictInt, StrictStr

from serve.page import PAGE
from serve.settings import Limits

EXAMPLE = '{"question": "Why is the sky blue?"}'


class ServiceError(Exception):
    """An error the client can act on, with its HTTP status (503 overloaded, 504 timed out)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class Service(Protocol):
    async def health(self) -> dict[str, Any]: ...
    async def model(self) -> dict[str, Any]: ...
    async def answer(self, question: str, top_k: int) -> dict[str, Any]: ...
    async def compare(self, question: str) -> dict[str, Any]: ...
    async def generate(self, question: str, max_new_tokens: int) -> dict[str, Any]: ...
    async def embed(self, texts: list[str]) -> dict[str, Any]: ...
    async def predict(self, question: str) -> dict[str, Any]: ...
    async def trace(self, question: str) -> dict[str, Any]: ...


def _plain_text(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or whitespace")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON: no tokenizer takes it
        raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from e
    return v


class AnswerItem(BaseModel):
    answer: str
    score: float


class AnswerResponse(BaseModel):
    answer: str  # the best answer (answers[0]), kept at the top level for simple clients
    score: float
    top_k: int
    answers: list[AnswerItem]
    model_version: str
    # embed: the teacher call's round trip; teacher, cube, search: compute of the batch this
    # question ran in; total: inside the API
    timings_ms: dict[str, float]
    batch_sizes: dict[str, int]  # how many questions the teacher and the cube ran together with this one


def build_api(service: Service, limits: Limits) -> FastAPI:
    """The FastAPI app for `service`, its request models sized by `limits`."""
    Text = Annotated[StrictStr, Field(min_length=1, max_length=limits.max_question_chars), AfterValidator(_plain_text)]

    class QuestionRequest(BaseModel):
        question: Text = Field(description=f"the question, 1 to {limits.max_question_chars} characters")

    class AnswerRequest(QuestionRequest):
        top_k: StrictInt = Field(1, ge=1, le=limits.max_top_k, description="how many answers, best first")

    class GenerateRequest(QuestionRequest):
        max_new_tokens: StrictInt = Field(limits.generation_max_new_tokens, ge=1, le=limits.generation_max_new_tokens,
                                          description="tokens the written answer may have")

    class EmbedRequest(BaseModel):
        texts: list[Text] = Field(min_length=1, max_length=limits.max_embed_texts)

    api = FastAPI(title="cellular cube", version="1",
                  description="Question → teacher embedding → 3D cellular cube → nearest answer of the run's corpus.")
    api.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes)
    api.add_exception_handler(RequestValidationError, _invalid_request)
    api.add_exception_handler(ServiceError, _service_error)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE

    @api.get("/healthz", summary="200 once every model is loaded, 503 before")
    async def healthz() -> dict[str, Any]:
        return await service.health()

    @api.get("/v1/model", summary="run id, teacher, cube config, held-out metrics, bank size")
    async def model() -> dict[str, Any]:
        return await service.model()

    @api.post("/v1/answer", response_model=AnswerResponse, summary="the cube's best answers, with timings")
    async def answer(request: AnswerRequest) -> dict[str, Any]:
        return await service.answer(request.question, request.top_k)

    @api.post("/v1/compare", summary="cube vs identity baseline vs the teacher's own generated answer")
    async def compare(request: QuestionRequest) -> dict[str, Any]:
        return await service.compare(request.question)

    @api.post("/v1/generate", summary="an answer written from the cube's predicted embedding (the run's decoder)")
    async def generate(request: GenerateRequest) -> dict[str, Any]:
        return await service.generate(request.question, request.max_new_tokens)

    @api.post("/v1/embed", summary="teacher embeddings of texts")
    async def embed(request: EmbedRequest) -> dict[str, Any]:
        return await service.embed(request.texts)

    @api.post("/v1/predict", summary="the cube's predicted answer embedding (centred space)")
    async def predict(request: QuestionRequest) -> dict[str, Any]:
        return await service.predict(request.question)

    @api.post("/v1/trace", summary="the lattice state per depth layer for a question")
    async def trace(request: QuestionRequest) -> dict[str, Any]:
        return await service.trace(request.question)

    return api


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    if not loc:
        if error.get("type") == "missing":
            return f"the request body is missing: send a JSON object such as {EXAMPLE}"
        return f"the request body must be a JSON object such as {EXAMPLE} ({msg})"
    return f"{'.'.join(loc)}: {msg}"


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        where = bad_json[0].get("ctx", {}).get("error", "")
        return JSONResponse(
            {"detail": f"the request body is not valid JSON ({where}); send an object such as {EXAMPLE}"},
            status_code=400,
        )
    # `input` is left out: it would echo an over-long question back to the client.
    listed = [{"loc": list(e.get("loc", ())), "msg": _describe(e), "type": e.get("type")} for e in errors]
    return JSONResponse({"detail": "; ".join(e["msg"] for e in listed), "errors": listed}, status_code=422)


async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)


class RequestGuard:
    """ASGI middleware: a POST must be JSON and at most `max_body_bytes` long. The body is read
    (up to the limit) before the app sees it, so an over-long body never reaches the parser."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return await _reject(send, 415, f"Content-Type must be application/json, got {media or 'none'!r}")
        declared = headers.get("content-length")
        if declared is not None and not declared.strip().isdigit():
            return await _reject(send, 400, f"Content-Length {declared!r} is not a number")
        if declared is not None and int(declared) > self.max_body_bytes:
            return await _reject(
                send, 413, f"the request body is {declared} bytes; the limit is {self.max_body_bytes} bytes"
            )
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _reject(send, 413, f"the request body is over the limit of {self.max_body_bytes} bytes")
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


async def _reject(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
