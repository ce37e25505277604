"""The Ray Serve application: the promoted model of a workspace behind POST /score, GET /health, GET /model.

    serve run serve.app:build_app workspace=WS [token=T] [max_batch_size=32] [replicas=auto]
    aae-ray serve WS [--host 127.0.0.1] [--port 8000] [--replicas N|auto] [--token T] [--max-batch B]
                     [--ingress haproxy|python]

A thin shell: the routes are `aae_ray.http_api`'s, limits, scoring and hot reload `aae_ray.serving`'s. Here: the
deployment, its batching (`@serve.batch` over single images, so a request of k images adds k items and any mix of
requests fills a forward pass), its resources and autoscaling, and starting and stopping Serve.
"""

import asyncio
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from aae_ray.cluster import cluster_resources, connect, worker_device
from aae_ray.http_api import http_api
from aae_ray.serving import Item, ScoringService, ServeSettings, free_port, settings

APP_NAME = "aae-ray"
# Serve's shutdown sends the driver a harmless error line; printing it makes Ray replace builtins.print for its
# progress bars (ray.experimental.tqdm_ray), after which pickling anything holding `print` (a Tuner's echo=print)
# fails in this process. Only the driver reads this, when it first prints such a line.
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
# Serve's ingress, chosen before Ray starts (Serve reads these once, in its own processes). "haproxy": Ray 2.60's
# HAProxy front end and direct replica data plane; on 2 cores it served 2.1x the requests of the Python proxy's
# best (bench/results/serve_load.md). Its stats and Prometheus listeners bind every interface (Ray's template):
# we move them to free ports so two endpoints on one machine do not collide. "python": Ray's Python proxy only.
# RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S: a stopping replica waits this long (Ray's default 30 s) for load
# balancers outside Ray to deregister it. Our only one is Serve's own HAProxy, which retries a refused connection
# on another replica, so 2 s is enough, and Ctrl-C no longer waits 30 s for "Controller failed to shut down".
INGRESS_ENV = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"},
    "python": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
}
HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def ingress_env(ingress: str) -> dict[str, str]:
    """The environment a Ray started here needs for this ingress (set it before `ray.init`)."""
    if ingress not in INGRESS_ENV:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_ENV)}, got {ingress!r}")
    env = dict(INGRESS_ENV[ingress])
    if ingress == "haproxy":
        env |= {name: str(os.environ.get(name) or free_port()) for name in HAPROXY_PORTS}
    return env


def _current() -> tuple[ScoringService, Callable]:
    """The routes' service and batched scorer: this replica's (Serve's context names the instance it runs; a
    module global would not do, since Serve ships the deployment class to its replicas by value)."""
    replica = serve.get_replica_context().servable_object
    return replica.service, replica.score_one


@serve.deployment
@serve.ingress(http_api(_current))
class Scorer:
    """One replica: the scoring service (the model, hot reload) and the batched scorer behind the routes."""

    def __init__(self, cfg: ServeSettings):
        self.service = ScoringService(cfg, worker_device())
        self.service.start_watching()
        self.service.start_logging()
        self.score_one.set_max_batch_size(cfg.max_batch_size)
        self.score_one.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # replaced per instance from the settings
    async def score_one(self, items: list[Item]) -> list[dict[str, Any]]:
        # In a thread: the event loop keeps reading and decoding requests while this batch runs.
        return await asyncio.to_thread(self.service.score_items, items)

    def __del__(self):  # Serve calls it when the replica shuts down
        if hasattr(self, "service"):
            self.service.stop()


def deployment_options(cfg: ServeSettings) -> dict[str, Any]:
    """Resources, concurrency and scaling. `max_ongoing_requests` is twice the batch size, so one batch can fill
    while another runs (at Serve's default of 5 batches never fill). With replicas "auto", Serve keeps 1 to
    (GPUs, or CPUs / num_cpus) replicas, aiming at half a batch of requests in flight on each: more means
    requests queue behind a full batch, so it adds a replica after 5 s; fewer for 60 s, it removes one."""
    cpus, gpus = cluster_resources()
    # ONNX Runtime runs here on the CPU (aae_ray.onnx_engine): a replica on it takes no GPU
    use_gpu = cfg.engine != "onnx" and (cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0))
    opts: dict[str, Any] = {"max_ongoing_requests": 2 * cfg.max_batch_size,
                            "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": 1 if use_gpu else 0}}
    if cfg.replicas == "auto":
        most = int(gpus) if use_gpu else int(cpus // cfg.num_cpus) if cfg.num_cpus else int(cpus)
        opts["autoscaling_config"] = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": max(1, most),
                                      "target_ongoing_requests": max(1, cfg.max_batch_size // 2),
                                      "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
    else:
        opts["num_replicas"] = cfg.replicas
    return opts


def application(cfg: ServeSettings):
    return Scorer.options(**deployment_options(cfg)).bind(cfg)


def build_app(args: dict[str, str]):
    """`serve run serve.app:build_app workspace=WS key=value ...`: keys are aae_ray.serving.ServeSettings'."""
    return application(settings(**args))


def start(cfg: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000, name: str = APP_NAME,
          route_prefix: str = "/") -> DeploymentHandle:
    """Deploy on the connected Ray (Serve's HTTP proxy on host:port, started if needed); returns when ready."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(cfg), name=name, route_prefix=route_prefix)


@contextmanager
def running(cfg: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
            ingress: str = "haproxy") -> Iterator[str]:
    """Serve for the length of a `with` block on the connected Ray (a local one with this ingress if none); yields
    the URL. Serve is shut down at the end (on a cluster joined through RAY_ADDRESS, only this application), Ray
    left as it was found."""
    connection = connect(local_env=ingress_env(ingress))
    try:
        start(cfg, host=host, port=port)
        yield f"http://{host}:{port}"
    finally:
        if connection == "joined":  # the cluster's other applications are not ours to stop
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        if connection == "started":
            ray.shutdown()


def serve_forever(cfg: ServeSettings, *, host: str, port: int, address: str | None = None,
                  ingress: str = "haproxy", echo: Callable[[str], None] = print) -> None:
    """`aae-ray serve`: start, print how to query, report promotions, and on SIGINT/SIGTERM shut down what we
    started (our own local Ray; on a cluster, only our application). A cluster's ingress is the one its
    `ray start` was given (INGRESS_ENV in that environment)."""
    connection = connect(address, local_env=ingress_env(ingress))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        svc_round = _current_round(cfg)
        start(cfg, host=host, port=port)
        url = f"http://{host}:{port}"
        echo(f"serving round {svc_round} of {cfg.workspace} at {url} (POST /score, GET /health, GET /model); "
             f"Ctrl-C stops it")
        echo(f"  try: curl -s -F file=@image.png {url}/score"
             + (' -H "Authorization: Bearer $TOKEN"' if cfg.token else ""))
        while not stop.wait(1.0):
            now = _current_round(cfg)
            if now != svc_round:
                echo(f"round {now} was promoted: the replicas load it while serving")
                svc_round = now
        echo("shutting down")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if connection == "started":
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)


def _current_round(cfg: ServeSettings) -> int | None:
    from aae_ray.workspace import Workspace

    try:
        cur = Workspace.open(cfg.workspace).current()
    except ValueError:
        return None
    return cur.get("round") if cur else None
