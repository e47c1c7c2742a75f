"""The ingress's relay, with stand-in replicas: what reaches the client when a replica stops part-way through."""

from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]' (the ray extra)")

from loramux.cluster import ingress
from loramux.cluster.protocol import ReplicaStopped

BODY = json.dumps({"model": "acme/a", "messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def event(data: dict | str, more: bool = True) -> dict:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return {"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": more}


def role(index: int = 0) -> dict:
    return event({"choices": [{"index": index, "delta": {"role": "assistant", "content": ""}}], "usage": None})


def token(text: str) -> dict:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


class Stream:
    """A replica's response: batches of ASGI messages, then the replica stops (`stops`) or the stream ends."""

    def __init__(self, batches: list[list[dict]], stops: bool) -> None:
        self.batches, self.stops, self.cancelled = batches, stops, False

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        for batch in self.batches:
            yield batch
        if self.stops:
            raise ReplicaStopped("the replica's engine stopped")

    def cancel(self) -> None:
        self.cancelled = True


class Replicas:
    """Ray Serve's handle to the replicas, answering each forwarded request with the next stream."""

    def __init__(self, streams: list[Stream]) -> None:
        self.streams = streams
        self.forward = self

    def options(self, **_):
        return self

    def remote(self, scope, body):
        return self.streams.pop(0)


class FakeIngress:
    def __init__(self, streams: list[Stream]) -> None:
        self.replicas = Replicas(streams)

    async def routing_key(self, path: str, body: bytes) -> str:
        return "acme/a"


def relay(streams: list[Stream]) -> list[dict]:
    """What the client receives for one streaming chat request."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    asyncio.run(ingress._Relay(FakeIngress(streams))(scope, receive, send))
    return sent


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(ingress, "RETRY_SECONDS", 0.0)


def test_a_replica_that_stops_before_the_first_token_leaves_the_stream_to_another():
    answer = [START, role(), token("Hello"), token(" there"), event("[DONE]", more=False)]
    sent = relay([Stream([[START, role(0), role(1)]], stops=True), Stream([answer], stops=False)])
    assert sent == answer  # the first replica's headers and role chunks never reached the client


def test_a_replica_that_stops_after_a_token_ends_the_stream_with_an_error_event():
    sent = relay([Stream([[START, role()], [token("Hello")]], stops=True), Stream([], stops=False)])
    assert sent[:3] == [START, role(), token("Hello")]
    error = json.loads(sent[3]["body"].decode().removeprefix("data: "))
    assert error["error"]["code"] == "replica_stopped" and error["error"]["type"] == "server_error"
    assert sent[4] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert len(sent) == 5


def test_a_stream_that_ends_at_once_is_sent_whole():
    answer = [START, role(), event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
              event("[DONE]", more=False)]  # fmt: skip
    assert relay([Stream([answer[:2], answer[2:]], stops=False)]) == answer
