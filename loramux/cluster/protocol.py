"""What the ingress and the replicas of a deployment exchange. The ingress forwards each HTTP request whole (its ASGI
scope, picklable, and its body) to `Replica.forward`, which runs it through the app of `loramux serve` and yields the
app's ASGI messages, in batches of those sent meanwhile; the ingress sends them on to the client as they come.
Imports neither torch nor the server's app: the ingress runs without them."""

from __future__ import annotations

# Paths that count in the request metrics as one server counts them (`loramux.server.api.app.ENDPOINTS`); the first
# two are the ones whose body names the model, and so the adapter a request is routed by.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}
ROUTED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

# Response headers a replica adds: which replica answered, and (for a request naming an adapter) whether that replica
# already held the adapter when the request reached it.
REPLICA_HEADER = b"x-loramux-replica"
RESIDENT_HEADER = b"x-loramux-adapter-resident"

# How the error of a replica that could not start begins (`loramux cluster serve` finds it in Ray Serve's status).
REPLICA_FAILED = "a replica could not start: "

_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
               "client", "server")  # fmt: skip


class ReplicaStopped(RuntimeError):
    """Raised by a replica whose engine is gone, before it takes the request: the ingress sends it to another."""


def forwarded_scope(scope: dict) -> dict:
    """The parts of an HTTP request's ASGI scope that a replica needs, as plain picklable values."""
    forwarded = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
    forwarded["headers"] = [(bytes(name), bytes(value)) for name, value in scope.get("headers", [])]
    for key in ("client", "server"):
        if forwarded.get(key) is not None:
            forwarded[key] = tuple(forwarded[key])
    return forwarded


def header(message: dict, name: bytes) -> bytes | None:
    """The value of header `name` (lower case) in an ASGI `http.response.start` message."""
    for key, value in message.get("headers", []):
        if key.lower() == name:
            return value
    return None
