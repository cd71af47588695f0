"""OpenAI-compatible HTTP server: decode the request -> the engine -> encode the response.

Images arrive as ``image_url`` parts holding base64 data URIs; local file paths only inside a directory the operator
names; remote URLs are never fetched. Every bad input is a 4xx whose message names the problem, in OpenAI's error
shape; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.engine import Engine, QueueFull, SamplingParams
from fovea.preprocess.document import DEFAULT_MAX_PAGES, Document, open_document
from fovea.serve.limits import CHARS_PER_TOKEN_BOUND, BodyLimits, ServerLimits, error_body, short
from fovea.serve.metrics import CONTENT_TYPE, ServerMetrics

WEB_DIR = Path(__file__).parent / "web"  # the web page: plain HTML, JS and CSS, no build step, nothing from a CDN
# The page runs only its own files: no inline script, no third-party origin; images may be data: or blob: URLs.
WEB_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff"}


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
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def decode_source(url: str, where: str, local_dir: Path | None) -> bytes | Path:
    """An ``image_url`` value or a file part's ``file_data``: the bytes of a base64 data URI, or a local path
    (only under ``local_dir``)."""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, f"{where}: data URI must be base64-encoded (data:<type>;base64,...)", where)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: invalid base64 in the data URI", where) from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: remote URLs are not fetched; send the file as a base64 data URI", where)
    if local_dir is None:
        raise ApiError(400, f"{where}: local file paths are disabled on this server; send a base64 data URI", where)
    path = Path(url.removeprefix("file://")).resolve()
    if not path.is_relative_to(local_dir):
        raise ApiError(400, f"{where}: path {url!r} is outside the allowed image directory", where)
    return path


def decode_document(url: str, where: str, local_dir: Path | None, max_pixels: int, max_pages: int,
                    target_side: int, name: str | None = None) -> Document:
    """An image, PDF or TIFF sent as a data URI (or an allowed local path) -> its pages, within the limits."""
    source = decode_source(url, where, local_dir)
    try:
        return open_document(source, max_pages=max_pages, max_pixels=max_pixels, target_side=target_side, name=name)
    except ValueError as err:
        raise ApiError(400, f"{where}: {err}", where) from None


def _check_text(text: str, where: str) -> str:
    if "\x00" in text:
        raise ApiError(400, f"{where} contains a NUL character", where)
    return text


def _image_parts(req: ChatRequest) -> int:
    return sum(1 for m in req.messages if isinstance(m.content, list)
               for p in m.content if isinstance(p, dict) and p.get("type") in ("image_url", "file"))


def check_request(req: ChatRequest, limits: ServerLimits, max_prompt_tokens: int) -> None:
    """The cheap bounds, before any image is decoded or any text tokenized: image parts per request and a character
    bound on the prompt (more characters than ``CHARS_PER_TOKEN_BOUND`` per allowed token cannot fit)."""
    images = _image_parts(req)
    if images > limits.max_images:
        raise ApiError(400, f"request has {images} images; the limit is {limits.max_images} (--max-images)",
                       "messages")
    chars = sum(len(m.content) if isinstance(m.content, str) else
                sum(len(p.get("text") or "") for p in m.content if isinstance(p, dict)
                    and isinstance(p.get("text"), str)) for m in req.messages)
    bound = max_prompt_tokens * CHARS_PER_TOKEN_BOUND
    if chars > bound:
        raise ApiError(400, f"prompt text of {chars:,} characters cannot fit the limit of {max_prompt_tokens:,} "
                       f"tokens (at most {bound:,} characters; --max-prompt-tokens)", "messages")


def _part_url(part: dict, kind: str, where: str) -> tuple[str, str | None]:
    """The data URI (or path) of an ``image_url`` or ``file`` part, and the file name when it has one."""
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise ApiError(400, f"{where}: an image_url part needs image_url.url", where)
        return url, None
    value = part.get("file")
    data = value.get("file_data") if isinstance(value, dict) else None
    if not isinstance(data, str) or not data:
        raise ApiError(400, f"{where}: a file part needs file.file_data (a base64 data URI; file_id is not "
                       "supported)", where)
    return data, value.get("filename") if isinstance(value.get("filename"), str) else None


def to_engine_input(req: ChatRequest, local_dir: Path | None, max_pixels: int,
                    max_request_pixels: int | None = None, max_pages: int = DEFAULT_MAX_PAGES,
                    target_side: int = 1536) -> tuple[list[dict], list]:
    """Chat messages and their page images for the engine. A PDF or TIFF becomes one image per page, each after a
    "Page N:" marker; the request's pages and pixels are bounded over all its files."""
    messages, images = [], []
    total_pixels = 0
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            if not message.content.strip() and message.role == "user":
                raise ApiError(400, f"messages[{i}].content is empty", f"messages[{i}].content")
            messages.append({"role": message.role, "content": _check_text(message.content, f"messages[{i}].content")})
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
                parts.append({"type": "text", "text": _check_text(part["text"], f"{where}.text")})
                continue
            if kind not in ("image_url", "file"):
                raise ApiError(400, f"{where}: unsupported part type {short(kind)}; use 'text', 'image_url' or "
                               "'file'", where)
            url, name = _part_url(part, kind, where)
            remaining = max_pages - len(images)
            if remaining < 1:
                raise ApiError(400, f"{where}: the request already has {len(images)} pages; the limit is {max_pages} "
                               "per request (--max-pages)", where)
            document = decode_document(url, where, local_dir, max_pixels, remaining, target_side, name)
            total_pixels += document.pixels
            _check_request_pixels(total_pixels, max_request_pixels, where)
            for number, page in zip(document.numbers, document.pages, strict=True):
                if document.kind != "image":
                    parts.append({"type": "text", "text": f"Page {number}:"})
                parts.append({"type": "image"})
                images.append(page)
        messages.append({"role": message.role, "content": parts})
    return messages, images


def _check_request_pixels(total: int, limit: int | None, where: str) -> None:
    if limit is not None and total > limit:
        raise ApiError(400, f"{where}: the request's pages reach {total:,} pixels; the limit is {limit:,} per "
                       "request (--max-request-pixels)", where)


def _engine_input(state: ServerState, body: ChatRequest) -> tuple[list[dict], list]:
    """``to_engine_input`` under this server's limits and its model's image settings."""
    pre = state.engine.model.config.preprocess
    return to_engine_input(body, state.local_dir, pre.max_pixels, state.limits.max_request_pixels,
                           state.limits.max_pages, pre.max_side)


@dataclass
class ServerState:
    """What the handlers read from ``app.state.fovea``."""

    engine: Engine  # the running engine
    metrics: ServerMetrics  # counters behind /metrics
    model_name: str  # the id /v1/models reports and requests must name (or omit)
    api_key: str | None  # required as 'Authorization: Bearer <key>' when set
    local_dir: Path | None  # image_url file paths are read only under this directory
    limits: ServerLimits  # per-request bounds
    max_prompt_tokens: int  # the prompt bound in tokens (limits, else the engine's context)
    public_metrics: bool  # /metrics without the key
    retry_after_s: int  # Retry-After on 429
    created: int  # /v1/models' timestamp


def _state(request: Request) -> ServerState:
    return request.app.state.fovea


def require_key(request: Request) -> None:
    """The auth dependency: with a key set, the request must carry it (compared in constant time)."""
    key = _state(request).api_key
    if key is None:
        return
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")


def metrics_auth(request: Request) -> None:
    if not _state(request).public_metrics:
        require_key(request)


router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """Liveness for load balancers, without a key; the queue figures only to callers with the key."""
    state = _state(request)
    try:
        require_key(request)
    except ApiError:
        return {"status": "ok"}
    return {"status": "ok", "running": len(state.engine.running), "waiting": state.engine.queue_depth()}


@router.get("/v1/models", dependencies=[Depends(require_key)])
async def models(request: Request):
    state = _state(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "fovea"}]}


@router.get("/metrics", dependencies=[Depends(metrics_auth)])
async def prometheus(request: Request):
    state = _state(request)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.post("/v1/fovea/attention", dependencies=[Depends(require_key)])
async def attention(body: ChatRequest, raw: Request):
    """Where the connector's queries looked for this request's question: per image, the share of their
    cross-attention on each cell of the encoder grid (Q-Former, Perceiver), with the geometry to lay it over the
    page; connectors without queries say it does not apply. Same body and limits as chat completions."""
    state = _state(raw)
    model = state.engine.model
    check_request(body, state.limits, state.max_prompt_tokens)

    def compute() -> list[dict[str, Any]]:
        messages, images = _engine_input(state, body)
        try:
            prompt = state.engine.processor(messages, images)
        except ValueError as err:
            raise ApiError(400, str(err), "messages") from None
        features, _ = state.engine.encoder_features(prompt)  # the page a chat request encoded is not encoded again
        maps = model.attention_maps([p.pixels for p in prompt.images], prompt.instructions, features=features)
        out = []
        for image, found in zip(prompt.images, maps, strict=True):
            height, width = image.pixels.shape[-2:]
            entry: dict[str, Any] = {"input": {"width": width, "height": height},
                                     "content": {"width": image.content_size[1], "height": image.content_size[0]},
                                     "pad_position": model.config.preprocess.pad_position}
            if found is None:
                entry.update(applies=False, reason=f"connector {model.config.connector.name!r} has no queries: "
                             "it reads every cell of the grid once")
            else:
                entry.update(applies=True, grid={"width": found.shape[1], "height": found.shape[0]},
                             weights=[[round(float(v), 6) for v in row] for row in found])
            out.append(entry)
        return out

    images = await run_in_threadpool(compute)
    return {"object": "fovea.attention", "model": state.model_name, "connector": model.config.connector.name,
            "images": images}


class PagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_data: str  # the document as a base64 data URI (image, PDF or TIFF), as in a chat ``file`` part
    filename: str | None = None  # its name, for messages


PREVIEW_SIDE = 1600  # the long side of a page preview: enough to read it on a screen, light to send back


@router.get("/v1/fovea/info", dependencies=[Depends(require_key)])
async def info(request: Request):
    """What a client needs before it sends anything: the model, its bridge, and this server's limits."""
    state = _state(request)
    model = state.engine.model
    return {"object": "fovea.info", "model": state.model_name, "encoder": model.config.vision.name,
            "connector": model.config.connector.name, "visual_token_budget": model.connector.budget,
            "attention_applies": model.connector.has_queries, "max_side": model.config.preprocess.max_side,
            "limits": {"max_body_mb": state.limits.max_body_mb, "max_images": state.limits.max_images,
                       "max_pages": state.limits.max_pages, "max_request_pixels": state.limits.max_request_pixels,
                       "max_prompt_tokens": state.max_prompt_tokens}}


@router.post("/v1/fovea/pages", dependencies=[Depends(require_key)])
async def pages(body: PagesRequest, raw: Request):
    """A document's pages as the model will see them (PDF pages rendered, TIFF frames split), as JPEG data URIs no
    larger than ``PREVIEW_SIDE``: for clients that cannot draw PDFs or TIFFs. Same limits as chat."""
    state = _state(raw)
    pre = state.engine.model.config.preprocess

    def render() -> list[dict[str, Any]]:
        document = decode_document(body.file_data, "file_data", state.local_dir, pre.max_pixels,
                                   state.limits.max_pages, pre.max_side, body.filename)
        _check_request_pixels(document.pixels, state.limits.max_request_pixels, "file_data")
        return [{"page": number, "width": page.width, "height": page.height, "image": _jpeg_uri(page)}
                for number, page in zip(document.numbers, document.pages, strict=True)]

    found = await run_in_threadpool(render)
    return {"object": "fovea.pages", "pages": found}


def _jpeg_uri(page) -> str:
    preview = page.copy()
    preview.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buf = io.BytesIO()
    preview.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


async def web_page():
    """The web page: no key needed to load it (it holds no data); it asks for the key when the API does."""
    return FileResponse(WEB_DIR / "index.html", headers=WEB_HEADERS)


@router.post("/v1/chat/completions", dependencies=[Depends(require_key)])
async def chat(body: ChatRequest, raw: Request):
    state = _state(raw)
    engine = state.engine
    if body.model not in (None, state.model_name):
        raise ApiError(404, f"model {short(body.model)} is not served here; this server serves "
                       f"{state.model_name!r}", "model")
    check_request(body, state.limits, state.max_prompt_tokens)
    try:
        params = SamplingParams(max_tokens=body.max_completion_tokens or body.max_tokens or 256,
                                temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                                seed=body.seed)
    except ValueError as err:
        raise ApiError(400, str(err)) from None

    sink = _AsyncSink(asyncio.get_running_loop())

    def admit():  # in a worker thread: decoding, preprocessing and encoding never block the event loop
        messages, images = _engine_input(state, body)
        return engine.add_request(messages, images, params, request_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
                                  events=sink)

    try:
        request = await run_in_threadpool(admit)
    except QueueFull as err:
        state.metrics.rejected.inc()
        raise ApiError(429, f"server busy: {err}", headers={"Retry-After": str(state.retry_after_s)}) from None
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    if body.stream:
        return StreamingResponse(_sse(state, request, sink, body, raw), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    text, reason, m = "", None, None
    try:
        async for event in _events(engine, request, sink, raw):
            text += event.text
            if event.finished:
                reason, m = event.finish_reason, event.metrics
    finally:
        if not request.done:
            engine.abort(request)
    state.metrics.observe(m)
    return {
        "id": request.id, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": _reason(reason)}],
        "usage": _usage(m), "fovea_metrics": m.to_dict() if m else None,
    }


class _AsyncSink:
    """The bridge from the engine thread to the event loop: the engine ``put``s events, the handler awaits them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, event) -> None:  # called on the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


DISCONNECT_CHECK_S = 0.25  # how often a waiting handler asks whether its client is still there


async def _events(engine: Engine, request, sink: _AsyncSink, raw: Request):
    """The request's engine events as they come; stops (and frees the slot) if the client leaves."""
    checked = time.monotonic()
    while True:
        try:
            event = await asyncio.wait_for(sink.queue.get(), timeout=DISCONNECT_CHECK_S)
        except TimeoutError:
            event = None
        if time.monotonic() - checked > DISCONNECT_CHECK_S:
            checked = time.monotonic()
            if await raw.is_disconnected():
                engine.abort(request)
                return
        if event is None:
            continue
        yield event
        if event.finished:
            return


async def _sse(state: ServerState, request, sink: _AsyncSink, body: ChatRequest, raw: Request):
    created_at = int(time.time())

    def chunk(delta: dict, reason: str | None = None, usage: dict | None = None) -> str:
        payload = {"id": request.id, "object": "chat.completion.chunk", "created": created_at,
                   "model": state.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for event in _events(state.engine, request, sink, raw):
            if event.text:
                yield chunk({"content": event.text})
            if event.finished:
                state.metrics.observe(event.metrics)
                yield chunk({}, _reason(event.finish_reason))
                if body.stream_options and body.stream_options.include_usage:
                    # the stage times ride along (as in the non-streaming body) so a streaming client can show cost
                    usage = {"id": request.id, "object": "chat.completion.chunk", "created": created_at,
                             "model": state.model_name, "choices": [], "usage": _usage(event.metrics),
                             "fovea_metrics": event.metrics.to_dict() if event.metrics else None}
                    yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away mid-stream: free its slot
        if not request.done:
            state.engine.abort(request)


async def _api_error(_: Request, err: ApiError):
    return _error(err.status, err.message, err.param, err.headers)


async def _invalid(_: Request, err: RequestValidationError):
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}")
        if e.get("type") == "extra_forbidden":
            problems.append(f"unknown parameter {short(loc)}")
        else:
            problems.append(f"{loc}: {e.get('msg')} (got {short(e.get('input'))})" if loc else e.get("msg"))
    return _error(400, "; ".join(problems) or "invalid request")


async def _http_error(_: Request, err: StarletteHTTPException):
    # FastAPI's own errors (an unparseable body such as deeply nested JSON, an unknown route) in OpenAI's shape
    return _error(err.status_code, str(err.detail), headers=getattr(err, "headers", None))


def create_app(engine: Engine, *, model_name: str = "fovea", api_key: str | None = None,
               local_image_dir: str | None = None, retry_after_s: int = 1, limits: ServerLimits | None = None,
               public_metrics: bool = False, web: bool = True) -> FastAPI:
    """The FastAPI app over a started (or to-be-started) ``engine``. With ``api_key`` every route that reveals
    anything needs it (``/metrics`` too unless ``public_metrics``) and the interactive docs are off. ``web`` serves
    the web page at ``/``."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: pass a non-empty --api-key, or none to serve without auth")
    limits = limits or ServerLimits()
    limits.validate()
    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="fovea", version="0.1.0", **docs)
    app.state.fovea = ServerState(
        engine=engine, metrics=ServerMetrics(engine), model_name=model_name, api_key=api_key,
        local_dir=Path(local_image_dir).resolve() if local_image_dir else None, limits=limits,
        max_prompt_tokens=min(limits.max_prompt_tokens or engine.config.max_len, engine.config.max_len),
        public_metrics=public_metrics, retry_after_s=retry_after_s, created=int(time.time()))
    app.state.engine, app.state.metrics = engine, app.state.fovea.metrics
    app.include_router(router)
    if web:
        app.add_api_route("/", web_page, methods=["GET"], include_in_schema=False)
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimits, limits=limits)
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
