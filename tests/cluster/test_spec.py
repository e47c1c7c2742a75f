"""ClusterSpec: what a Ray Serve config file's `args` may say, checked before anything starts."""

from __future__ import annotations

import pytest

from loramux.cluster.spec import ClusterSpec


def test_a_spec_round_trips_through_the_settings_that_differ_from_the_defaults():
    spec = ClusterSpec(replicas=4, base="/models/base", slots=8, database_url="postgresql://db/registry",
                       overlap_outputs=False, log_level="INFO")  # fmt: skip
    written = spec.to_dict()
    assert written == {"replicas": 4, "base": "/models/base", "slots": 8, "database_url": "postgresql://db/registry",
                       "overlap_outputs": False, "log_level": "INFO"}  # fmt: skip
    assert ClusterSpec.from_dict(written) == spec
    assert ClusterSpec.from_dict(None) == ClusterSpec()


def test_unknown_settings_are_refused_with_the_known_ones_listed():
    with pytest.raises(ValueError, match=r"unknown loramux cluster setting\(s\): replica, slot \(known: .*replicas"):
        ClusterSpec.from_dict({"replica": 2, "slot": 3})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"replicas": 0}, "replicas must be a whole number of at least 1, got 0"),
        ({"replicas": True}, "replicas must be a whole number of at least 1, got True"),
        ({"replicas": "2"}, "replicas must be a whole number of at least 1, got '2'"),
        ({"slots": -1}, "slots must be a whole number, not negative, got -1"),
        ({"shutdown_grace": "soon"}, "shutdown_grace must be a number, not negative, got 'soon'"),
        ({"quantize": "int8"}, "quantize must be one of auto, nf4, none, got 'int8'"),
        ({"device": "cuda:1"}, "device must be cpu or cuda"),
        ({"overlap_outputs": "yes"}, "overlap_outputs must be true or false, got 'yes'"),
        ({"log_level": "LOUD"}, "log_level must be a logging level"),
    ],
)
def test_bad_settings_are_refused_with_one_line(args, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        ClusterSpec.from_dict(args)


def test_the_engine_and_server_settings_of_each_replica(monkeypatch):
    from loramux.server.serve_cli import MiB

    monkeypatch.setenv("LORAMUX_BLOB_URL", "s3://bucket/prefix")
    monkeypatch.delenv("LORAMUX_DATABASE_URL", raising=False)
    spec = ClusterSpec(slots=3, max_num_seqs=16, adapter_cache_mb=64, data_dir="/srv/data", log_level="info")
    engine = spec.engine_config()
    assert (engine.num_slots, engine.max_num_seqs, engine.adapter_cache_bytes) == (3, 16, 64 * MiB)
    settings = spec.server_settings("cpu")
    assert settings.device == "cpu" and str(settings.data_dir) == "/srv/data" and settings.log_level == 20
    assert settings.blob_url == "s3://bucket/prefix" and settings.database_url is None  # the replica's environment
    assert spec.batch_size(gpu=False) == 16 and ClusterSpec().batch_size(gpu=True) > ClusterSpec().batch_size(False)
