"""OpenAI-shaped errors for what FastAPI itself refuses: a body that is not JSON, a field of the wrong type."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from loramux.server.api.errors import install_handlers


class Body(BaseModel):
    model: str
    max_tokens: int = 16


def app() -> FastAPI:
    application = FastAPI()
    install_handlers(application)

    @application.post("/v1/chat/completions")
    def route(body: Body) -> dict:
        return {"ok": True}

    return application


async def _post(content: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})


def test_a_malformed_json_body_says_so_and_names_no_parameter():
    import asyncio

    answer = asyncio.run(_post(b'{"model": "tiny", "max_tokens": 4 "oops": 1}'))
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] is None and error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    assert error["message"] == (
        "We could not parse the JSON body of your request: Expecting ',' delimiter at character 34."
    )


def test_a_field_of_the_wrong_type_names_its_parameter():
    import asyncio

    answer = asyncio.run(_post(b'{"model": "tiny", "max_tokens": "many"}'))
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "max_tokens" and error["message"].startswith("max_tokens: ")
