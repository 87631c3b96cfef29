"""An upper bound on the size of an HTTP request body, as ASGI middleware.

vLLM's server reads any request body whole, however large: one client can make it hold
gigabytes of base64 image. vLLM takes extra middleware by import path, so the bound needs
no change to vLLM:

    --middleware par_vllm.limits.RequestBodyLimit     (PAR_MAX_REQUEST_BYTES, default 32 MiB)

A larger body is answered 413 in OpenAI's error format before anything parses it. The
Docker entrypoint adds the middleware.
"""

from __future__ import annotations

import json
import os

ENV = "PAR_MAX_REQUEST_BYTES"
DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DRAIN_FACTOR = 4


class RequestBodyLimit:
    def __init__(self, app, max_bytes: int | None = None):
        self.app = app
        self.max_bytes = max_bytes if max_bytes is not None else int(os.environ.get(ENV, DEFAULT_MAX_BYTES))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await self._reject(send)
        # Read the body here (the server reads it whole anyway), so a chunked body with no
        # declared length is bounded too; the application gets it replayed. An oversized
        # body is read on (and dropped) up to DRAIN_FACTOR times the limit before the 413, so
        # that a client still sending sees the answer rather than a broken connection.
        body, size, more = bytearray(), 0, True
        while more and size <= DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size <= self.max_bytes:
                body += chunk
        if size > self.max_bytes:
            return await self._reject(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    async def _reject(self, send) -> None:
        payload = json.dumps({"error": {
            "message": f"request body larger than this server's limit of {self.max_bytes} bytes "
                       f"({ENV})",
            "type": "RequestTooLarge", "param": None, "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
