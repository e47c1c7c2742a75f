"""The Ray Serve application of loramux: `build(args)` -> the ingress bound to `args["replicas"]` replicas and the
metrics board. `loramux cluster serve` runs it; a Ray Serve config file names it as its import path:

    applications:
      - name: loramux
        route_prefix: /
        import_path: loramux.cluster.app:build
        args: {replicas: 2, base: /models/llama-3-8b, database_url: "postgresql://...", blob_url: "s3://..."}

(`loramux cluster config ...` prints such a file.)"""

from __future__ import annotations

import dataclasses

from loramux.cluster.spec import ClusterSpec

APP_NAME = "loramux"
HEALTH_CHECK_SECONDS = 5.0
ONGOING_BATCHES = 2  # the default max_ongoing_requests of a replica, in batches (max_num_seqs)


def build(args: dict | None = None):
    """The application that `args` (ClusterSpec's fields) describe. Each replica takes one GPU where `device` is cuda,
    or where it is left out and the Ray cluster has GPUs; one process on `cpus_per_replica` CPUs otherwise."""
    from loramux.cluster.ingress import Ingress
    from loramux.cluster.metrics import MetricsBoard
    from loramux.cluster.replica import Replica

    spec = ClusterSpec.from_dict(args)
    gpu = spec.device == "cuda" or (spec.device is None and _cluster_has_gpus())
    spec = dataclasses.replace(spec, device="cuda" if gpu else "cpu")
    board = MetricsBoard.bind()
    replicas = Replica.options(
        num_replicas=spec.replicas,
        # A replica takes a full batch and a second one waiting before requests for its adapters go to other replicas
        # (which then load them); beyond what every replica takes, up to max_queue requests wait at the ingress, and
        # later ones get a 429.
        max_ongoing_requests=spec.max_ongoing_requests or ONGOING_BATCHES * spec.batch_size(gpu),
        max_queued_requests=spec.max_queue,
        ray_actor_options={"num_cpus": spec.cpus_per_replica, "num_gpus": 1 if gpu else 0},
        graceful_shutdown_timeout_s=spec.shutdown_grace,
        health_check_period_s=HEALTH_CHECK_SECONDS,
    ).bind(spec, board)
    return Ingress.options(num_replicas=spec.ingress_replicas).bind(replicas, board)


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1
