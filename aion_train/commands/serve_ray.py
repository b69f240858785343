"""`aion-train serve --ray`: the serve app as a Ray Serve deployment (serve/ray_deployment.py)
on the cluster at --ray-address or on a private loopback head (pipeline/local_cluster.py),
until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading


def _check_inputs(args) -> str | None:
    """Fail before starting Ray on what a replica would fail on (bundle, keys, audit log)."""
    from aion_train.policy import PolicyError, PolicySet
    from aion_train.serve.server import read_api_keys

    try:
        if args.policy:
            PolicySet.load(args.policy)
        if args.api_key_file:
            read_api_keys(args.api_key_file)
    except (PolicyError, OSError, ValueError) as e:
        return str(e)
    return None


def run_ray(args, log) -> int:
    problem = _check_inputs(args)
    if problem:
        print(f"serve: {problem}", file=sys.stderr)
        return 1
    from aion_train.pipeline.local_cluster import LocalCluster
    from aion_train.pipeline.runner import connect
    from aion_train.serve.ray_deployment import application

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = None
    try:
        if args.ray_address:
            address = args.ray_address
        else:
            need = args.replicas * args.num_cpus_per_replica
            cluster = LocalCluster(num_cpus=max(1, int(need + 0.999))).start()
            address = cluster.gcs_address
        connect(address)
        from ray import serve

        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(application(args, args.replicas, args.num_cpus_per_replica), name="aion", route_prefix="/")
        except Exception as e:  # noqa: BLE001 - a replica that cannot start: say why, exit 1
            print(f"serve: the Ray Serve deployment did not start: {e}", file=sys.stderr)
            return 1
        log.info(
            "serving with Ray Serve on http://%s:%d: %d replicas, %.2f CPUs each (cluster %s)",
            args.host,
            args.port,
            args.replicas,
            args.num_cpus_per_replica,
            address,
            extra={"aion": {"host": args.host, "port": args.port, "replicas": args.replicas, "ray": address}},
        )
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        import ray

        if ray.is_initialized():
            try:
                from ray import serve

                serve.shutdown()
            finally:
                ray.shutdown()
        if cluster is not None:
            left = cluster.stop()
            if left:
                log.error("Ray processes still alive after stop: %s", left)
