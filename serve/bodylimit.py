"""ASGI middleware: refuse request bodies over a byte limit with HTTP 413.

A declared Content-Length over the limit is refused before any of the body is read; a body
without one (chunked) is counted as it arrives and refused as soon as it passes the limit:
the wrapped `receive` raises an `HTTPException(413)`, which FastAPI's body reader passes
through to its exception handler. A Content-Length that is not a number is a 400.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


DEFAULT_LIMIT = 8 * 1024 * 1024
_process_limit = [DEFAULT_LIMIT]


def set_process_limit(max_bytes: int) -> None:
    """The limit of every BodyLimitMiddleware created without one, in this process."""
    _process_limit[0] = int(max_bytes)


class BodyLimitMiddleware:
    """`max_bytes`: the limit; None: the process-wide one (`set_process_limit`), read per request."""

    def __init__(self, app, max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes if self.max_bytes is not None else _process_limit[0]
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_json(send, 400, "Content-Length is not a number")
                if declared > limit:
                    return await _send_json(send, 413, f"request body is {declared} bytes; the limit is {limit}")
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)
