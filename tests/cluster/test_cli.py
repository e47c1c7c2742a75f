"""`loramux cluster` as a user runs it: one line and a non-zero exit on bad input or without Ray, and the Ray Serve
config file that `loramux cluster config` prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loramux.cluster.cli import NEEDS_RAY

# `loramux` with Ray hidden from imports, as where the ray extra is not installed.
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from loramux.cli import main; sys.exit(main(sys.argv[1:]))"


def run_cli(*args: str, without_ray: bool = False) -> subprocess.CompletedProcess:
    command = ["-c", WITHOUT_RAY] if without_ray else ["-m", "loramux.cli"]
    return subprocess.run([sys.executable, *command, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("action", ["serve", "config"])
def test_without_ray_it_names_the_extra_in_one_line(action, tmp_path):
    result = run_cli("cluster", action, "--data-dir", str(tmp_path / "data"), without_ray=True)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"loramux cluster: error: {NEEDS_RAY}\n"
    assert run_cli("--help", without_ray=True).returncode == 0  # the other commands do not need it


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "0"], "replicas must be a whole number of at least 1, got 0"),
        (["--port", "0"], "--port must be between 1 and 65535, got 0"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
        (["--cpus-per-replica", "-1"], "cpus_per_replica must be a number, not negative, got -1.0"),
        (["--device", "tpu"], "device must be cpu or cuda (each replica gets one GPU of its own), got 'tpu'"),
    ],
)
def test_bad_options_get_one_line_and_a_non_zero_exit(args, message, tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]' (the ray extra)")
    from loramux.cli import main

    for action in ("config", "serve"):  # refused before Ray starts
        assert main(["cluster", action, "--data-dir", str(tmp_path / "data"), *args]) == 1
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", f"loramux cluster: error: {message}\n")


def test_config_prints_a_ray_serve_config_file_of_the_options(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]' (the ray extra)")
    import yaml

    from loramux.cluster.spec import ClusterSpec

    data = tmp_path / "data"
    result = run_cli("cluster", "config", "--replicas", "3", "--base", "/models/base", "--data-dir", str(data),
                     "--host", "0.0.0.0", "--port", "8100", "--slots", "6", "--adapters-per-replica", "12")  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8100}
    [application] = config["applications"]
    assert application["import_path"] == "loramux.cluster.app:build" and application["route_prefix"] == "/"
    assert application["args"] == {"replicas": 3, "base": "/models/base", "data_dir": str(data.resolve()), "slots": 6,
                                   "adapters_per_replica": 12}  # fmt: skip
    assert ClusterSpec.from_dict(application["args"]).replicas == 3  # what `build` will read back
    from ray.serve.schema import ServeDeploySchema

    deploy = ServeDeploySchema.model_validate(config)  # what `serve deploy FILE` checks the file against
    assert deploy.http_options.port == 8100 and deploy.applications[0].import_path == "loramux.cluster.app:build"


def test_replicas_of_several_machines_need_a_registry_that_every_machine_reaches():
    from loramux.cluster.cli import _check_one_registry, _check_resources
    from loramux.cluster.spec import ClusterSpec

    _check_one_registry(ClusterSpec(data_dir="/srv/data"), nodes=1)  # one machine: its SQLite and blob folder do
    _check_one_registry(ClusterSpec(database_url="postgresql://db/r", blob_url="s3://bucket/r"), nodes=3)
    for spec in (ClusterSpec(data_dir="/srv/data"), ClusterSpec(database_url="postgresql://db/r")):
        with pytest.raises(ValueError, match="^this Ray cluster has 3 nodes: its replicas need one registry"):
            _check_one_registry(spec, nodes=3)
    _check_resources(ClusterSpec(replicas=2, device="cuda"), {"GPU": 2.0, "CPU": 8.0})
    with pytest.raises(ValueError, match="^3 replicas need a GPU each; this machine has 2$"):
        _check_resources(ClusterSpec(replicas=3, device="cuda"), {"GPU": 2.0, "CPU": 8.0})
    with pytest.raises(ValueError, match=r"^2 replicas of 1.5 CPUs need 3; this machine has 2 \(--cpus-per-replica\)"):
        _check_resources(ClusterSpec(replicas=2, cpus_per_replica=1.5), {"CPU": 2.0})


def test_a_deployment_that_failed_says_why_in_one_line(monkeypatch):
    """Ray Serve raises 'Failed to update the deployments'; the replica's own error is the tail of a traceback in
    its status, and that is the line the command prints."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]' (the ray extra)")
    from types import SimpleNamespace

    from ray import serve

    from loramux.cluster.cli import _deployment_failure

    traceback = (
        "The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n  File ...\n"
        "RuntimeError: a replica could not start: could not load the base model: base model 'x' not found"
    )
    replica = SimpleNamespace(message=traceback)
    status = SimpleNamespace(applications={"loramux": SimpleNamespace(message="", deployments={"Replica": replica})})
    monkeypatch.setattr(serve, "status", lambda: status)
    failure = RuntimeError("Deploying application loramux failed: Failed to update the deployments ['Replica'].")
    assert _deployment_failure(failure) == (
        "a replica could not start: could not load the base model: base model 'x' not found"
    )
    replica.message = "the replica's health check failed\nsee the log"
    assert _deployment_failure(failure) == failure.args[0]  # nothing of ours: Ray Serve's own line


def test_a_proxy_replaced_while_ray_serve_starts_is_waited_for_and_a_start_that_fails_is_one_line(monkeypatch):
    """On a busy machine Ray Serve may replace its HTTP proxy while `serve.start` waits for it (ActorDiedError):
    the start is asked again; a start that keeps failing, or any other Ray error, ends in one line."""
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[dev]' (the ray extra)")
    from ray import serve
    from ray.exceptions import ActorDiedError, GetTimeoutError

    from loramux.cluster import cli

    calls = []

    def start(errors):
        def fake(**kwargs):
            calls.append(kwargs)
            if errors:
                raise errors.pop(0)

        return fake

    monkeypatch.setattr(serve, "start", start([ActorDiedError()]))
    cli._start_serve("127.0.0.1", 8000)
    assert calls == [{"http_options": {"host": "127.0.0.1", "port": 8000}}] * 2

    monkeypatch.setattr(serve, "start", start([ActorDiedError()] * cli.SERVE_START_ATTEMPTS))
    with pytest.raises(ValueError, match=r"^Ray Serve could not start its HTTP proxy: The actor died unexpectedly"):
        cli._start_serve("127.0.0.1", 8000)
    monkeypatch.setattr(serve, "start", start([GetTimeoutError("Get timed out: some object(s) not ready.\nmore")]))
    with pytest.raises(ValueError, match=r"^Ray Serve could not start: Get timed out: some object\(s\) not ready\.$"):
        cli._start_serve("127.0.0.1", 8000)
