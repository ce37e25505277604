"""Where aae-ray talks to Ray: joining a cluster or starting a Ray of our own, and fitting a detector to what Ray
gave the worker it runs in.

Tune (`tuning/runner.py`), Serve (`serve/app.py`) and Ray Data pool scoring (`pool_scoring.py`) all connect and
place work through here, so `--address`, RAY_ADDRESS, token auth and a replica's GPU mean the same in each.

    how = connect(address)              # join address (or RAY_ADDRESS), or start a local Ray; reuse a connection
    device = worker_device()            # in an actor or replica: "cuda" on its GPU, else "cpu" on its CPUs
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Literal

Connection = Literal["started", "joined", "reused"]


class ClusterError(RuntimeError):
    """No Ray to work on: the address does not answer or refuses us; the message says what to check."""


def connect(address: str | None = None, *, num_cpus: int | None = None,
            local_env: Mapping[str, str] | None = None) -> Connection:
    """Join the cluster at `address` (else RAY_ADDRESS), or start a fresh Ray on this machine with `num_cpus`
    (default: all) and `local_env` set first (variables Ray's own processes read once, at their start, such as
    Serve's ingress). A running connection is reused. Returns how: "started" (a Ray of our own: the caller shuts
    it down), "joined" (a cluster: the caller removes only what it put there) or "reused"."""
    import ray

    if ray.is_initialized():
        return "reused"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Ray 2.60 clusters started with `ray start` use token auth; without this every call is refused.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        _check_reachable(address)  # Ray itself retries an unreachable address for about 14 minutes
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as exc:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from exc
        return "joined"
    os.environ.update(local_env or {})
    # "local": a fresh Ray of our own, never a cluster some earlier `ray start` left on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return "started"


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc}); check the address, or start one with "
                           f"`ray start --head`") from exc


def worker_device() -> str:
    """The device for a detector in this Ray actor or replica: "cuda" when Ray assigned it a GPU that torch sees
    (Ray sets CUDA_VISIBLE_DEVICES to it), else "cpu" with torch and BLAS capped at one thread a reserved CPU,
    since several workers at torch's default (a thread a core) would oversubscribe the machine."""
    import ray
    import torch

    from aae_ray.training_loop import limit_threads

    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    limit_threads(max(1, round(cpus)))
    return "cpu"


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) of the connected cluster, or of this machine when Ray is not started (`serve run` builds the
    application before it connects)."""
    import ray

    if ray.is_initialized():
        res = ray.cluster_resources()
        return res.get("CPU", 1.0), res.get("GPU", 0.0)
    import torch

    return float(os.cpu_count() or 1), float(torch.cuda.device_count())
