"""A size limit on request bodies: an inference request larger than the limit is answered 413 (OpenAI-shaped) before
any of it is parsed, whether it announces its size (Content-Length) or streams it chunked."""

from __future__ import annotations

import json

MAX_BODY_BYTES = 8 << 20  # far above any prompt that fits a context window, far below what hurts the server


class BodyLimit:
    """ASGI wrapper: bodies of requests to `paths` may hold at most `limit` bytes. Other paths (the hub's uploads)
    keep their own limits. The checked body is handed on whole; later `receive` calls (a client's disconnect while
    a stream runs) go to the server as before."""

    def __init__(self, app, paths: set[str], limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.paths, self.limit = app, paths, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending it all
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        error = {
            "message": f"The request body is larger than the limit of {self.limit} bytes.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
        payload = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
