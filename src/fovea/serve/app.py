"""OpenAI-compatible HTTP server: decode the request -> the engine -> encode the response.

Images arrive as ``image_url`` parts holding base64 data URIs; local file paths only inside a directory the operator
names; remote URLs are never fetched. Every bad input is a 4xx whose message names the problem, in OpenAI's error
shape; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fovea.engine import Engine, QueueFull, SamplingParams
from fovea.preprocess import load_image
from fovea.serve.metrics import ServerMetrics


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request fovea serves; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded"}.get(status, "api_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


def decode_image(url: str, where: str, local_dir: Path | None, max_pixels: int):
    """An ``image_url`` value to a PIL image: data URIs always, local paths only under ``local_dir``."""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{where}: data URI must be base64-encoded (data:image/...;base64,...)", where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: invalid base64 in the data URI", where) from None
        source: Any = raw
    elif url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: remote image URLs are not fetched; send the image as a base64 data URI", where)
    else:
        if local_dir is None:
            raise ApiError(400, f"{where}: local image paths are disabled on this server; send a base64 data URI",
                           where)
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(local_dir):
            raise ApiError(400, f"{where}: path {url!r} is outside the allowed image directory", where)
        source = path
    try:
        return load_image(source, max_pixels=max_pixels)
    except ValueError as err:
        raise ApiError(400, f"{where}: {err}", where) from None


def to_engine_input(req: ChatRequest, local_dir: Path | None, max_pixels: int) -> tuple[list[dict], list]:
    messages, images = [], []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            if not message.content.strip() and message.role == "user":
                raise ApiError(400, f"messages[{i}].content is empty", f"messages[{i}].content")
            messages.append({"role": message.role, "content": message.content})
            continue
        parts = []
        if not message.content:
            raise ApiError(400, f"messages[{i}].content is an empty list", f"messages[{i}].content")
        for j, part in enumerate(message.content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}: a text part needs a 'text' string", where)
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                value = part.get("image_url")
                url = value.get("url") if isinstance(value, dict) else value
                if not isinstance(url, str) or not url:
                    raise ApiError(400, f"{where}: an image_url part needs image_url.url", where)
                images.append(decode_image(url, where, local_dir, max_pixels))
                parts.append({"type": "image"})
            else:
                raise ApiError(400, f"{where}: unsupported part type {kind!r}; use 'text' or 'image_url'", where)
        messages.append({"role": message.role, "content": parts})
    return messages, images


def create_app(engine: Engine, *, model_name: str = "fovea", api_key: str | None = None,
               local_image_dir: str | None = None, retry_after_s: int = 1) -> FastAPI:
    """The FastAPI app over a started (or to-be-started) ``engine``."""
    app = FastAPI(title="fovea", version="0.1.0")
    metrics = ServerMetrics()
    local_dir = Path(local_image_dir).resolve() if local_image_dir else None
    max_pixels = engine.model.config.preprocess.max_pixels
    admission = threading.Lock()  # preprocessing and the encoder cache are used by one request at a time
    created = int(time.time())
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return _error(err.status, err.message, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            if e.get("type") == "json_invalid":
                return _error(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
            if e.get("type") == "extra_forbidden":
                problems.append(f"unknown parameter {loc!r}")
            else:
                problems.append(f"{loc}: {e.get('msg')} (got {e.get('input')!r})" if loc else e.get("msg"))
        return _error(400, "; ".join(problems) or "invalid request")

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": engine.queue_depth()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "fovea"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, raw: Request):
        if body.model not in (None, model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {model_name!r}",
                           "model")
        try:
            params = SamplingParams(max_tokens=body.max_completion_tokens or body.max_tokens or 256,
                                    temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                    stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                                    seed=body.seed)
        except ValueError as err:
            raise ApiError(400, str(err)) from None

        def admit():
            messages, images = to_engine_input(body, local_dir, max_pixels)
            with admission:
                return engine.add_request(messages, images, params, request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}")

        try:
            request = await run_in_threadpool(admit)
        except QueueFull as err:
            metrics.rejected += 1
            raise ApiError(429, f"server busy: {err}", headers={"Retry-After": str(retry_after_s)}) from None
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        if body.stream:
            return StreamingResponse(_sse(request, body, raw), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, reason, m = "", None, None
        try:
            async for event in _events(request, raw):
                text += event.text
                if event.finished:
                    reason, m = event.finish_reason, event.metrics
        finally:
            if not request.done:
                engine.abort(request)
        metrics.observe(m)
        return {
            "id": request.id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _reason(reason)}],
            "usage": _usage(m), "fovea_metrics": m.to_dict() if m else None,
        }

    async def _events(request, raw: Request):
        """The request's engine events, polled without blocking the event loop; stops if the client leaves."""
        checked = time.monotonic()
        while True:
            try:
                event = request.events.get_nowait()
            except queue.Empty:
                if time.monotonic() - checked > 0.25:
                    checked = time.monotonic()
                    if await raw.is_disconnected():
                        engine.abort(request)
                        return
                await asyncio.sleep(0.003)
                continue
            yield event
            if event.finished:
                return

    async def _sse(request, body: ChatRequest, raw: Request):
        created_at = int(time.time())

        def chunk(delta: dict, reason: str | None = None, usage: dict | None = None) -> str:
            payload = {"id": request.id, "object": "chat.completion.chunk", "created": created_at,
                       "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in _events(request, raw):
                if event.text:
                    yield chunk({"content": event.text})
                if event.finished:
                    metrics.observe(event.metrics)
                    yield chunk({}, _reason(event.finish_reason))
                    if body.stream_options and body.stream_options.include_usage:
                        usage = {"id": request.id, "object": "chat.completion.chunk", "created": created_at,
                                 "model": model_name, "choices": [], "usage": _usage(event.metrics)}
                        yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream: free its slot
            if not request.done:
                engine.abort(request)

    return app


def _reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop" if reason == "abort" else (reason or "stop")


def _usage(m) -> dict[str, Any]:
    if m is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "visual_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}
    return {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
            "total_tokens": m.prompt_tokens + m.completion_tokens, "visual_tokens": m.visual_tokens,
            "prompt_tokens_details": {"cached_tokens": m.cached_tokens}}
