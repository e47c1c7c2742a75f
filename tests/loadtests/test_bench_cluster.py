"""The cluster benchmark's arithmetic and options (its runs start Ray Serve deployments: they are measured by hand,
`python loadtests/bench_cluster.py --tiny`, and recorded under loadtests/results/)."""

from __future__ import annotations

import pytest

from loadtests.bench_cluster import affinity, parse_args, scaling, table


def figures(tokens_per_s: float, ttft: float, share: float | None) -> dict:
    return {"tokens_per_s": tokens_per_s, "requests_per_s": tokens_per_s / 32, "ttft_p50_s": ttft, "ttft_p99_s": ttft,
            "tpot_p50_s": 0.01, "requests_failed": 0, "affinity": share and {"share": share}}  # fmt: skip


def test_scaling_compares_each_replica_count_with_one_and_one_with_a_plain_server():
    results = {"runs": {"replicas_1": figures(300, 2.0, 0.5), "replicas_2": figures(540, 1.0, 0.75),
                        "replicas_4": figures(900, 0.5, 0.8), "serve": figures(400, 1.5, None)}}  # fmt: skip
    assert scaling(results) == {
        "tokens_per_s_2_over_1": 1.8, "ttft_p50_2_over_1": 0.5, "tokens_per_s_4_over_1": 3.0,
        "ttft_p50_4_over_1": 0.25, "tokens_per_s_1_replica_over_serve": 0.75,
    }  # fmt: skip
    results["scaling"] = scaling(results)
    lines = table(results).splitlines()
    assert lines[1].split()[0] == "replicas_1" and lines[1].split()[-1] == "0.500" and lines[4].split()[-1] == "-"
    assert scaling({"runs": {"replicas_2": figures(540, 1.0, 0.75)}}) == {}  # nothing to compare with


def test_affinity_is_the_share_of_adapter_requests_that_found_their_adapter():
    assert affinity({"true": 10, "false": 5}, {"true": 40, "false": 15}) == {
        "share": 0.75, "resident": 30, "not_resident": 10
    }  # fmt: skip
    assert affinity({}, {}) is None  # one server: no routing, no figure


@pytest.mark.parametrize("replicas", ["0,2", "one", ""])
def test_bad_replica_counts_are_refused(replicas, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--replicas", replicas, "--json", "/tmp/x.json"])
    assert "--replicas" in capsys.readouterr().err
