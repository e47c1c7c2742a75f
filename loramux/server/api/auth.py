"""Who is calling: the tenant of the request's bearer API key. With no keys configured the server is single-user
(every caller is the local user, tenant None); once keys exist, inference needs a valid key."""

from __future__ import annotations

from fastapi import Request

from loramux.registry.http import bearer_token
from loramux.registry.registry import Caller, Unauthorized
from loramux.server.api.errors import unauthorized


def caller_of(request: Request) -> Caller:
    """The FastAPI dependency: the request's caller; 401 for a missing, unknown or revoked key when keys exist."""
    state = request.app.state.loramux
    try:
        caller = state.registry.caller(bearer_token(request))
    except Unauthorized as exc:
        raise unauthorized("Incorrect or revoked API key provided.") from exc
    if not caller.local and caller.tenant is None:
        raise unauthorized("This server needs an API key: send it as 'Authorization: Bearer KEY'.")
    request.state.tenant = caller.tenant
    return caller
