"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.registry.store import StorageUnavailableError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error the API reports to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def model_not_found(model: str) -> APIError:
    # The same answer for a model that does not exist and one the caller may not read.
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unauthorized(message: str = "Invalid or missing API key.") -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def overloaded(retry_after: int = 1) -> APIError:
    return APIError(
        429,
        "The server is at capacity; retry after a short wait.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after)},
    )


def storage_unavailable(exc: StorageUnavailableError) -> APIError:
    return APIError(
        503,
        exc.public_message,
        type="server_error",
        code="storage_unavailable",
        headers={"Retry-After": "5"},
    )


_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def install_handlers(app: FastAPI) -> None:
    """Make every error, including FastAPI's own validation and routing errors, OpenAI-shaped."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its "location" is a character offset, not a field
            where = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
            reason = (first.get("ctx") or {}).get("error") or "invalid JSON"
            at = f" at character {where}" if where is not None else ""
            message = f"We could not parse the JSON body of your request: {reason}{at}."
            return APIError(400, message, code="invalid_json").response()
        location = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = _STATUS_TYPES.get(
            exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error"
        )
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return APIError(exc.status_code, detail, type=error_type, headers=dict(exc.headers or {})).response()

    @app.exception_handler(StorageUnavailableError)
    async def _storage_unavailable(request: Request, exc: StorageUnavailableError) -> JSONResponse:
        # The registry's database or bucket is down: nothing was recorded, and the same request may work later.
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return storage_unavailable(exc).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "Internal server error.", type="server_error").response()
