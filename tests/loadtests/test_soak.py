"""The soak of record (`loadtests/soak.py`): its tiny variant runs whole on the CPU, so that CI guards it; its memory
verdict, its classification of answers and the engine statistics it watches are checked on their own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from loadtests import soak as soak_module
from loadtests.soak import MiB, Request, Tally, checks, main, memory_growth, parse_args, prepare, send
from loramux.server.engine.llm_engine import EngineConfig, LLMEngine
from loramux.server.models.loader import load_base


@pytest.mark.slow  # converts the default model once for its tokenizer
def test_tiny_soak_passes_every_check(tmp_path: Path, capsys, default_base_dir):
    out = tmp_path / "soak.json"
    argv = ["--tiny", "--duration", "12", "--sample-every", "1", "--concurrency", "8",
            "--workdir", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().out[-3000:]
    results = json.loads(out.read_text())
    assert results["passed"] and all(check["passed"] is not False for check in results["checks"].values())
    assert results["checks"]["device_memory_flat"]["passed"] is None  # the CPU: no device memory to watch
    counts = results["load"]["counts"]
    assert sum(c["failed"] for c in counts.values()) == 0, results["load"]["errors"]
    assert counts["drop"]["dropped"] > 0
    assert all(c["ok"] > 0 for kind, c in counts.items() if kind != "drop"), counts
    assert results["load"]["short"] == 0 and results["load"]["tokens"] > 0  # EOS ignored: answers as long as asked
    assert set(results["end"]["gauges"].values()) == {0}
    assert results["end"]["counters"]["adapter_slot_loads"] > 2  # 12 adapters through 2 slots: they rotated
    assert len(results["samples"]) >= 5 and all(s["memory_bytes"] > 0 for s in results["samples"])
    assert results["server"]["exit_status"] == 0
    printed = capsys.readouterr().out
    assert "host_memory_flat     PASS" in printed and printed.rstrip().endswith(f"wrote {out}")


def test_a_tokenizer_without_a_chat_template_is_refused_before_a_checkpoint_is_written(tmp_path, default_base_dir):
    """A fifth of the soak's requests are chats: a --tokenizer directory without a chat template would make them all
    fail after 15 minutes, so the soak stops at once and says why."""
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # chat_template.jinja left out
        (tokenizer / name).write_bytes((default_base_dir / name).read_bytes())
    args = parse_args(["--tiny", "--tokenizer", str(tokenizer), "--adapters", "1"])
    with pytest.raises(ValueError, match="has no chat template"):
        prepare(args, tmp_path / "work", {})
    assert not (tmp_path / "work" / "checkpoint").exists()


def test_a_failure_in_the_warm_up_stops_the_soak_before_its_load(monkeypatch):
    """Whatever fails requests in the warm-up (a set-up error) would fail them for the whole load: the soak stops there
    and says what failed."""
    runs = []

    def clients(url, settings, concurrency, processes, seed, budget=None, deadline=None):
        runs.append(budget)
        counts = {"completion": {"ok": 30, "dropped": 0, "failed": 0}, "chat": {"ok": 0, "dropped": 0, "failed": 9}}
        return {"counts": counts, "errors": ["chat bench/w2-1: http_400: no chat template"]}

    monkeypatch.setattr(soak_module, "run_clients", clients)
    results: dict = {}
    with pytest.raises(RuntimeError, match=r"warm-up had failed requests \{'chat': 9\}"):
        soak_module.load(parse_args(["--tiny"]), "http://soak", None, {}, results)
    assert len(runs) == 1 and runs[0] is not None  # the warm-up's budget; the load never started
    assert results["warmup"]["counts"]["chat"]["failed"] == 9


def test_memory_growth_passes_flat_fails_growing_and_says_when_samples_are_too_few():
    flat = [(t, 1000 * MiB + (t % 3) * MiB) for t in range(100)]
    assert memory_growth(flat, 100, 256 * MiB, 0.1)["passed"] is True
    growing = [(t, 1000 * MiB + t * 5 * MiB) for t in range(100)]  # about 300 MiB from the early to the late window
    grown = memory_growth(growing, 100, 256 * MiB, 0.1)
    assert grown["passed"] is False and grown["growth"] > grown["bound"] == 256 * MiB
    assert memory_growth(growing, 100, 512 * MiB, 0.1)["passed"] is True  # within a larger floor
    assert memory_growth(growing, 100, 0, 0.5)["passed"] is True  # within half the early median
    short = memory_growth([(0.0, MiB), (1.0, MiB)], 100, 256 * MiB, 0.1)
    assert short["passed"] is None and short["early_samples"] == short["late_samples"] == 0
    absent = memory_growth([(t, None) for t in range(100)], 100, 256 * MiB, 0.1)  # no device memory reported
    assert absent["passed"] is None


def answer(request: Request, handler) -> tuple[str, int, str | None]:
    async def go():
        async with httpx.AsyncClient(base_url="http://soak", transport=httpx.MockTransport(handler)) as client:
            return await send(client, request, timeout=5)

    return asyncio.run(go())


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


STREAM = Request("stream_completion", "/v1/completions", {"model": "m", "max_tokens": 3, "stream": True})
TEXT = {"choices": [{"index": 0, "text": "a"}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}


def test_answers_are_classified_and_failures_reported():
    assert answer(STREAM, lambda r: httpx.Response(200, content=sse(TEXT, TEXT, TEXT, USAGE, "[DONE]"))) == (
        "ok", 3, None
    )  # fmt: skip
    drop = Request("drop", "/v1/completions", STREAM.body, drop_after=2)
    assert answer(drop, lambda r: httpx.Response(200, content=sse(TEXT, TEXT, TEXT, USAGE, "[DONE]")))[:2] == (
        "dropped", 2
    )  # fmt: skip
    refused = answer(STREAM, lambda r: httpx.Response(500, json={"error": {"message": "boom"}}))
    assert refused[0] == "failed" and refused[2].startswith("http_500") and "boom" in refused[2]
    cut = answer(STREAM, lambda r: httpx.Response(200, content=sse(TEXT, TEXT)))  # no [DONE]
    assert cut[0] == "failed" and cut[2].startswith("disconnect")
    no_usage = answer(STREAM, lambda r: httpx.Response(200, content=sse(TEXT, "[DONE]")))
    assert no_usage[0] == "failed" and no_usage[2].startswith("no_usage")
    error = answer(STREAM, lambda r: httpx.Response(200, content=sse(TEXT, {"error": {"message": "engine died"}})))
    assert error[0] == "failed" and "engine died" in error[2]
    plain = Request("chat", "/v1/chat/completions", {"model": "m", "max_tokens": 3})
    assert answer(plain, lambda r: httpx.Response(200, json={"choices": [{}], "usage": USAGE["usage"]})) == (
        "ok", 3, None
    )  # fmt: skip
    assert answer(plain, lambda r: httpx.Response(200, json={"choices": [{}]}))[0] == "failed"  # no usage

    # Counted, kept as an example and failing the verdict.
    tally = Tally()
    tally.add(STREAM, *refused)
    tally.add(plain, "ok", 3, None)
    verdict = checks({"load": vars(tally)}, duration=10, on_cuda=False)
    assert verdict["no_failures"]["passed"] is False and verdict["no_failures"]["failed"] == 1
    assert "http_500" in verdict["no_failures"]["errors"][0]
    assert verdict["completed_enough"]["passed"] is False  # the other kinds completed nothing


def test_engine_stats_leave_device_memory_out_on_the_cpu(tiny_checkpoint):
    base = load_base(str(tiny_checkpoint()), device="cpu")
    stats = LLMEngine(base, None, EngineConfig(num_slots=0, num_kv_blocks=16, block_size=4)).stats()
    assert stats["kv_blocks_total"] == 16 and stats["engine_pid"] > 0
    assert not [key for key in stats if key.startswith("device_memory")]
