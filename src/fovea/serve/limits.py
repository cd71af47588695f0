"""What one request may cost the server, and the ASGI layer that enforces the body limits before any handler runs.

The body guard is plain ASGI, not an HTTP middleware: Starlette's ``BaseHTTPMiddleware`` hides a client's
disconnect from the handler, and an abandoned request then kept its KV-cache slot to the last token.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

# A BPE token covers a few characters on average and rarely more than 16: a prompt with more characters than
# 16 x the token limit cannot fit, and is refused before the tokenizer spends seconds on it.
CHARS_PER_TOKEN_BOUND = 16
ERROR_VALUE_CHARS = 60  # how much of a bad value an error message quotes


@dataclass
class ServerLimits:
    max_body_mb: float = 64.0  # request bodies larger than this get 413 without being read whole
    max_images: int = 8  # image and file parts per request
    max_pages: int = 16  # page images per request over all its files (a PDF page or TIFF frame is one page)
    max_request_pixels: int = 64_000_000  # decoded pixels over all images of one request
    max_prompt_tokens: int | None = None  # prompt tokens per request (None = the engine's context length)
    read_timeout_s: float = 30.0  # a request body that stalls this long between chunks gets 408

    def validate(self) -> None:
        for name in ("max_body_mb", "max_images", "max_pages", "max_request_pixels", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"server limit {name} must be > 0, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"server limit max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def short(value: object) -> str:
    """A bad value as an error message quotes it: its repr, cut to a short prefix with its full length."""
    text = repr(value)
    if len(text) <= ERROR_VALUE_CHARS:
        return text
    return f"{text[:ERROR_VALUE_CHARS]}... ({len(text):,} characters)"


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
            503: "server_overloaded"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class BodyLimits:
    """ASGI wrapper: a declared Content-Length over the limit is refused at once (413, the body is never read); a
    body that grows past it while streaming in is cut off with 413; a body that stalls for ``read_timeout_s``
    between chunks is cut off with 408 (half-sent bodies no longer hold connections open)."""

    def __init__(self, app, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes "
                                    "(--max-body-mb)")
            return
        seen = 0
        replied = body_done = False

        async def guarded_receive():
            # Once the guard has answered, the app sees a client that left: it stops reading and sends nothing.
            nonlocal seen, replied, body_done
            if replied:
                return {"type": "http.disconnect"}
            if body_done:  # only the body is timed: later reads wait for a disconnect for as long as a stream lasts
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=self.limits.read_timeout_s)
            except TimeoutError:
                replied = True
                await _reply(send, 408, f"request body stalled for {self.limits.read_timeout_s:g} s (read timeout)")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > limit:
                    replied = True
                    await _reply(send, 413, f"request body exceeds the limit of {limit:,} bytes (--max-body-mb)")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not replied:
                await send(message)

        await self.app(scope, guarded_receive, guarded_send)


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
