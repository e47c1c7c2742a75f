"""The scheduling simulation drives the engine's scheduler through a small W2-like workload to the end."""

from __future__ import annotations

from loadtests.sim_scheduler import parse_args, simulate


def small(slots: int, *extra: str) -> dict:
    args = ["--requests", "60", "--adapters", "30", "--slots", str(slots), "--prompt", "8", "--gen", "4",
            "--max-seqs", "16", "--max-batched-tokens", "64", *extra]  # fmt: skip
    return simulate(parse_args(args))


def test_every_request_completes_and_more_slots_take_fewer_steps():
    few, many = small(2), small(32)
    for result in (few, many):
        assert result["slot_loads"] >= result["distinct_adapters"]  # each adapter used went through a slot
        assert 0 < result["running_mean"] <= 16
        assert result["ttft_p99_s"] >= result["ttft_p50_s"] > 0
    assert many["steps"] < few["steps"]
    assert many["running_mean"] > few["running_mean"]


def test_slot_memory_paged_by_rank_runs_more_adapters_at_once_than_one_per_slot():
    paged, unpaged = small(4), small(4, "--page-rank", "64")
    assert (paged["page_rank"], unpaged["page_rank"]) == (8, 64)
    assert paged["running_mean"] > unpaged["running_mean"] and paged["steps"] < unpaged["steps"]


def test_the_cost_models_order_as_measured():
    eager, graphs = small(8), small(8, "--costs", "h200-graphs")
    assert graphs["seconds"] < eager["seconds"]  # the graphs' prompt passes cost far less
