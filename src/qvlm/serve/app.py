"""The FastAPI app: the page at `/`, the OpenAI-compatible API under `/v1` (plus `/v1/attention`, the
queries' attention maps), and `/health`.

Requests are parsed and checked here (cheap, on the event loop or the thread pool); only checked work
reaches the single model worker (`worker.py`). Images are decoded a few at a time (`decode_slots`) and
shrunk right away, so concurrent large images cannot multiply the server's memory.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from qvlm.serve.attention import attention_body, parse_attention_request
from qvlm.serve.chat import ChatRequest, parse_chat_request
from qvlm.serve.errors import APIError, error_body
from qvlm.serve.images import fetch_image
from qvlm.serve.settings import LOOPBACK_NAMES, ServeSettings, is_loopback
from qvlm.serve.stream import stream_chunks
from qvlm.serve.worker import AttentionJob, Job, ModelWorker, Result

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("qvlm.serve")
# The page loads nothing from elsewhere; say so to the browser so injected content can't either.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def create_app(model, model_id: str, settings: ServeSettings | None = None) -> FastAPI:
    """An app serving `model` (a loaded QVLM) as `model_id`. The worker thread runs while the app does."""
    settings = settings or ServeSettings()
    worker = ModelWorker(model, settings.batch_size, settings.max_queue)
    decode_slots = anyio.CapacityLimiter(settings.decode_slots)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="qvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    _install_error_handlers(app)
    if is_loopback(settings.host):
        app.add_middleware(LoopbackHostCheck, host=settings.host)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "qvlm"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, "stage": model.stage, "auth_required": bool(settings.api_key),
                "queued": worker.pending(), "max_image_bytes": settings.max_image_bytes,
                "max_prompt_chars": settings.max_prompt_chars}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        require_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        require_key(request)
        if name != model_id:
            raise _unknown_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        require_key(request)
        _require_json(request)
        chat = parse_chat_request(await _read_json(request, settings.max_body_bytes), settings)
        if chat.model is not None and chat.model != model_id:
            raise _unknown_model(chat.model)
        if model.stage != 2:
            raise APIError(400, "this is a stage-1 model (Q-Former only, for retrieval): it cannot caption or "
                           "answer; serve a run trained through stage 2", code="model_not_generative")
        image = await fetch_image(chat.image_url, settings, decode_slots, model.vision.image_size)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            chunks = stream_chunks(worker, Job(image, chat.text, chat.gen), completion_id, model_id,
                                   chat.include_usage)
            return StreamingResponse(_first_then_rest(await anext(chunks), chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await worker.run(Job(image, chat.text, chat.gen), gone=request.is_disconnected)
        if result is None:  # the client left; its job was dropped. 499: nginx's "client closed request"
            return Response(status_code=499)
        return _completion(result, completion_id, model_id, chat)

    @app.post("/v1/attention")
    async def attention(request: Request):
        """Where each query looks on the image: works for stage-1 models too (it needs only the Q-Former);
        which queries each word of the answer drew on (`words`): stage-2 models."""
        require_key(request)
        _require_json(request)
        wanted = parse_attention_request(await _read_json(request, settings.max_body_bytes), settings)
        if wanted.words and model.stage != 2:
            raise APIError(400, "`words` needs a stage-2 model: this stage-1 model has no language model to "
                           "answer with", code="model_not_generative", param="words")
        image = await fetch_image(wanted.image_url, settings, decode_slots, model.vision.image_size, param="image")
        job = AttentionJob(image, wanted.text, wanted.words, settings.default_max_tokens)
        attention = await worker.run(job, gone=request.is_disconnected)
        if attention is None:  # the client left; its job was dropped
            return Response(status_code=499)
        return attention_body(attention)

    return app


async def _first_then_rest(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    # The first chunk was pulled before the response started, so a full queue is a 429, not a broken stream.
    yield first
    async for chunk in rest:
        yield chunk


def _completion(result: Result, completion_id: str, model_id: str, chat: ChatRequest) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                     "logprobs": None, "finish_reason": result.finish_reason}],
        "usage": result.usage(),
    }


def _unknown_model(name: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist on this server; see GET /v1/models",
                    param="model", code="model_not_found")


def _require_json(request: Request) -> None:
    """Only JSON bodies: a cross-site page can POST `text/plain` without a CORS preflight, never JSON."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"send the request body as JSON with `Content-Type: application/json` "
                       f"(got {media_type or 'none'!r})", code="unsupported_media_type")


class LoopbackHostCheck:
    """On a loopback bind, answer only requests addressed to a loopback name: a page on another site
    whose DNS name is re-pointed at 127.0.0.1 (DNS rebinding) still sends its own name as Host.
    Plain ASGI rather than `@app.middleware`, which would get between streamed responses and disconnects."""

    def __init__(self, app: ASGIApp, host: str):
        self.app = app
        self.allowed = LOOPBACK_NAMES | {"127.0.0.1", "::1", host.lower().strip("[]")}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            name = _host_name(Headers(scope=scope).get("host", ""))
            if name and name not in self.allowed:
                message = f"this server answers only to {sorted(self.allowed)}, not to Host {name!r}"
                await JSONResponse(error_body(message, code="invalid_host"), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """The name part of a Host header: `[::1]:8000` -> `::1`, `localhost:8000` -> `localhost`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


async def _read_json(request: Request, limit: int) -> object:
    """The body as JSON, read no further than `limit` bytes (413 beyond), malformed JSON -> 400."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # chunked uploads have no content-length: count as they arrive
            raise _too_large(len(body), limit)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError also covers integers past Python's digit limit; RecursionError, nesting like [[[[...
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json") from e


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is too large ({size} bytes > {limit})", code="request_too_large")


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as the OpenAI shape, never FastAPI's default `{"detail": ...}`."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(f"invalid request: {exc.errors()}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type_="server_error"),
                            status_code=500)
