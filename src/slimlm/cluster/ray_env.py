"""Ray as an optional extra: a one-line error without it, and a quick check of ``--ray-address``
(Ray itself waits minutes on an address where nothing listens)."""

from __future__ import annotations

import os
import socket

from slimlm.errors import SlimLMError


def require_ray():
    try:
        import ray
    except ImportError:
        raise SlimLMError("this needs Ray: pip install 'slimlm[ray]'") from None
    return ray


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """SlimLMError unless something listens at ``host:port`` (``ray://`` and ``auto`` are Ray's to resolve)."""
    if address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise SlimLMError(f"--ray-address must be HOST:PORT (or ray://HOST:PORT, auto), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise SlimLMError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def init_ray(address: str | None, num_cpus: int | None = None):
    """Join the cluster at ``address``, or start a local Ray instance (``num_cpus`` for it)."""
    ray = require_ray()
    if address:
        check_address(address)
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw = {"address": address} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    try:
        ray.init(log_to_driver=bool(os.environ.get("SLIMLM_RAY_LOGS")), **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SlimLMError(f"could not start or join Ray{f' at {address}' if address else ''}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray
