"""`loramux cluster serve`: N replicas of `loramux serve` (one GPU each) behind Ray Serve's HTTP proxy, routed by
adapter; `loramux cluster config`: the same deployment as a Ray Serve config file, for `serve deploy` on a running
Ray cluster. Ray is an extra: `pip install 'loramux[ray]'`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

from loramux.cluster.protocol import REPLICA_FAILED
from loramux.cluster.spec import ClusterSpec
from loramux.registry.cli.common import blob_url, database_url, open_registry
from loramux.registry.cli.hub import is_loopback
from loramux.server.serve_cli import add_server_arguments, check_arguments

NEEDS_RAY = "the cluster commands need Ray Serve: pip install 'loramux[ray]'"
# Ray Serve replaces an HTTP proxy that misses 3 health checks in a row, each of 10 s by default: on a machine busy
# loading models that can be a healthy proxy still starting. A Ray started here gives each check 30 s.
PATIENT_PROXY = {"RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}
SERVE_START_ATTEMPTS = 3

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    serve = actions.add_parser(
        "serve",
        help="serve N replicas behind Ray Serve's HTTP proxy, routed by adapter",
        description="Serve N replicas of `loramux serve` (an engine process and the OpenAI-compatible API each, one "
        "GPU each) behind Ray Serve's HTTP proxy on --host:--port; requests for an adapter go to a replica that "
        "holds it while that replica has room. Every replica shares one registry.",
    )
    config = actions.add_parser(
        "config",
        help="print a Ray Serve config file (YAML) of this deployment, for `serve deploy`",
        description="Print the Ray Serve config file of the deployment these options describe (`serve deploy FILE` "
        "on a running Ray cluster). Variables (LORAMUX_*, AWS_*) are read on each node, not written into the file.",
    )
    for command in (serve, config):
        add_server_arguments(command)
        _add_cluster_arguments(command)
    serve.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to run on: auto (the one `ray start` runs on this machine), HOST:6379, or "
        "ray://HOST:10001 (default: start Ray on this machine for this command, and stop it after); where Ray Serve "
        "runs there already, its proxy keeps the host and port it started with",
    )


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=1, help="engine replicas, one GPU each (default 1)")
    parser.add_argument(
        "--adapters-per-replica",
        type=int,
        default=None,
        help="adapters a replica counts as held for routing, the least recently used forgotten first (default: its "
        "engine's slots)",
    )
    parser.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests a replica takes at once; past it, requests for its adapters go to other replicas and the "
        "rest wait, up to --max-queue (default: twice --max-num-seqs, a full batch and a second one waiting)",
    )
    parser.add_argument(
        "--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves for each replica (default 1)"
    )
    parser.add_argument(
        "--ingress-replicas", type=int, default=1, help="processes that forward requests to replicas (default 1)"
    )


def spec_from_args(args: argparse.Namespace) -> ClusterSpec:
    check_arguments(args)
    data_dir = str(args.data_dir.resolve()) if args.data_dir is not None else None
    return ClusterSpec(
        replicas=args.replicas,
        base=args.base,
        quantize=args.quantize,
        device=args.device,
        cpus_per_replica=args.cpus_per_replica,
        data_dir=data_dir,
        database_url=database_url(args),
        blob_url=blob_url(args),
        hub=args.hub,
        slots=args.slots,
        max_lora_rank=args.max_lora_rank,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue=args.max_queue,
        adapter_cache_mb=args.adapter_cache_mb,
        adapter_readers=args.adapter_readers,
        overlap_outputs=args.overlap_outputs,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        shutdown_grace=args.shutdown_grace,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        adapters_per_replica=args.adapters_per_replica,
        max_ongoing_requests=args.max_ongoing_requests,
        ingress_replicas=args.ingress_replicas,
    )


def run(args: argparse.Namespace) -> int:
    require_ray()
    spec = spec_from_args(args)
    if args.action == "config":
        print(config_file(spec, args.host, args.port), end="")
        return 0
    return serve(spec, args)


def require_ray() -> None:
    """Stop with one line, naming the extra to install, where Ray Serve cannot be imported."""
    # Every replica's log lines, not one of each kind (Ray reads it when it is imported).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ValueError(NEEDS_RAY) from None


def config_file(spec: ClusterSpec, host: str, port: int) -> str:
    """The Ray Serve config file (YAML) that deploys `spec` with the proxy on host:port."""
    import yaml

    from loramux.cluster.app import APP_NAME

    application = {"name": APP_NAME, "route_prefix": "/", "import_path": "loramux.cluster.app:build",
                   "args": spec.to_dict()}  # fmt: skip
    return yaml.safe_dump({"http_options": {"host": host, "port": port}, "applications": [application]},
                          sort_keys=False)  # fmt: skip


def serve(spec: ClusterSpec, args: argparse.Namespace) -> int:
    """Deploy on Ray (started here, or the cluster at --address), wait for SIGTERM or SIGINT, then take the
    application down (replicas drain their requests first) and, if this command started Ray, stop it."""
    import ray
    from ray import serve as ray_serve

    from loramux.cluster.app import APP_NAME, build

    _check_storage(spec, args)
    if args.hub_token:
        if args.address:
            raise ValueError("--hub-token reaches no replica of a running Ray cluster: set LORAMUX_TOKEN on its nodes")
        os.environ["LORAMUX_TOKEN"] = args.hub_token  # the replicas of a Ray started here inherit this environment
    if not args.address:  # the Ray started here, and its processes, take these from this environment
        for name, value in PATIENT_PROXY.items():
            os.environ.setdefault(name, value)
    ray.init(address=args.address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        _check_one_registry(spec, len([node for node in ray.nodes() if node["Alive"]]))
        if not args.address:
            _check_resources(spec, ray.cluster_resources())
        _start_serve(args.host, args.port)
        print(f"loramux cluster: deploying {spec.replicas} replica(s) on Ray...", flush=True)
        try:
            ray_serve.run(build(spec.to_dict()), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica could not start: Ray Serve's status says why
            raise ValueError(f"the deployment failed: {_deployment_failure(exc)}") from None
        print(f"loramux cluster on http://{args.host}:{args.port}: {spec.replicas} replica(s) ready", flush=True)
        stopping: list[int] = []  # (a signal handler must not take locks: Event.set here could deadlock the wait)
        previous = {sig: signal.signal(sig, lambda signum, _: stopping.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
        try:
            while not stopping:
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        print("loramux cluster: stopping (requests in flight finish first)", flush=True)
        ray_serve.delete(APP_NAME)
    finally:
        if not args.address:
            ray_serve.shutdown()
        ray.shutdown()
    print("loramux cluster: stopped", flush=True)
    return 0


def _start_serve(host: str, port: int) -> None:
    """Ray Serve's controller and HTTP proxy. A proxy that does not answer its health checks while the machine is
    busy starting is replaced by the controller, and `serve.start`, waiting for the one it replaced, raises: the
    start is asked again (it joins the controller, which brings the new proxy up) up to `SERVE_START_ATTEMPTS` times.
    """
    from ray import serve as ray_serve
    from ray.exceptions import RayActorError, RayError

    for attempt in range(1, SERVE_START_ATTEMPTS + 1):
        try:
            ray_serve.start(http_options={"host": host, "port": port})
            return
        except RayActorError as exc:
            if attempt == SERVE_START_ATTEMPTS:
                raise ValueError(f"Ray Serve could not start its HTTP proxy: {_first_line(exc)}") from None
            log.warning("Ray Serve's HTTP proxy was replaced while starting (%s); waiting for the new one", exc)
        except (RayError, TimeoutError) as exc:
            raise ValueError(f"Ray Serve could not start: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _deployment_failure(exc: RuntimeError) -> str:
    """One line on why the deployment failed: a replica's own error where Ray Serve's status holds it (the tail of
    a traceback), else the first line of Ray Serve's."""
    from ray import serve as ray_serve

    from loramux.cluster.app import APP_NAME

    try:
        application = ray_serve.status().applications.get(APP_NAME)
        messages = [application.message, *(d.message for d in application.deployments.values())] if application else []
    except Exception:  # the status is out of reach as well: what Ray Serve raised is all there is
        messages = []
    for message in messages:
        for line in reversed((message or "").splitlines()):
            if REPLICA_FAILED in line:
                return line[line.index(REPLICA_FAILED) :].strip()
    return _first_line(exc)


def _check_one_registry(spec: ClusterSpec, nodes: int) -> None:
    """Stop with one line where the replicas of several machines would each open a registry of their own."""
    if nodes > 1 and (spec.database_url is None or spec.blob_url is None):
        raise ValueError(
            f"this Ray cluster has {nodes} nodes: its replicas need one registry that every node reaches "
            "(--database-url and --blob-url, or LORAMUX_DATABASE_URL and LORAMUX_BLOB_URL)"
        )


def _check_resources(spec: ClusterSpec, resources: dict) -> None:
    """Stop with one line where the Ray started here cannot place every replica (it would wait for them forever)."""
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if spec.device == "cuda" and spec.replicas > gpus:
        raise ValueError(f"{spec.replicas} replicas need a GPU each; this machine has {gpus:.0f}")
    if spec.replicas * spec.cpus_per_replica > cpus:
        raise ValueError(
            f"{spec.replicas} replicas of {spec.cpus_per_replica:g} CPUs need {spec.replicas * spec.cpus_per_replica:g}"
            f"; this machine has {cpus:.0f} (--cpus-per-replica)"
        )


def _check_storage(spec: ClusterSpec, args: argparse.Namespace) -> None:
    """Stop with one line, before Ray starts, where the registry cannot be reached or the address needs API keys."""
    registry = open_registry(args)
    try:
        keys = registry.store.has_keys()
    finally:
        registry.close()
    if not keys and not is_loopback(args.host) and not args.allow_insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {args.host} with no API keys (single-user mode lets anyone use the server); "
            "create one with `loramux tenants create NAME` and `loramux keys create NAME`, "
            "or pass --allow-insecure-no-auth"
        )
