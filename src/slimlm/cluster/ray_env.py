"""Ray as an optional extra: a one-line error without it, a quick check of ``--ray-address``
(Ray itself waits minutes on an address where nothing listens), and Ray's token auth when joining.

Token auth (Ray >= 2.59): ``ray start --head`` turns token authentication on by itself when a token
exists (``~/.ray/auth_token``, which any earlier local ``ray.init()`` writes), but
``ray.init(address=HOST:PORT)`` turns it on only for ``address=None``/``"auto"``. A driver joining
by address then sends no token and the GCS answers ``InvalidAuthToken`` (Ray's error then names the
head's node IP, e.g. ``192.0.2.2:6379``, because Ray rewrites a local address to it; the address is
not the problem). :func:`enable_token_auth` does for an explicit address what Ray does for
``"auto"``: with ``RAY_AUTH_MODE`` unset and a token available, it sets ``RAY_AUTH_MODE=token``
for this process. A token-mode client also joins a cluster without auth.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

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


def token_available() -> bool:
    """Whether Ray would find an auth token: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return bool(Path(path).read_text().strip())
    except OSError:
        return False


def enable_token_auth() -> bool:
    """``RAY_AUTH_MODE=token`` for this process when it is unset and a token is available; whether token mode is on.

    An explicit ``RAY_AUTH_MODE`` (``disabled`` or ``token``) is respected as it is.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    if not token_available():
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import; reread it, as Ray does when it enables token auth itself
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):
        pass
    return True


def _auth_failed(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 8:
        if type(e).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def init_ray(address: str | None, num_cpus: int | None = None):
    """Join the cluster at ``address``, or start a local Ray instance (``num_cpus`` for it)."""
    ray = require_ray()
    if address:
        check_address(address)
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init() would join it)
    kw = {"address": address} if address else {"address": "local", "num_cpus": num_cpus, "include_dashboard": False}
    if address:
        enable_token_auth()
    try:
        ray.init(log_to_driver=bool(os.environ.get("SLIMLM_RAY_LOGS")), **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        if address and _auth_failed(e):
            raise SlimLMError(
                f"the Ray cluster at {address} refused this client's auth token (token auth is on there): set "
                "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token, `ray get-auth-token` on its head "
                "node") from None
        raise SlimLMError(f"could not start or join Ray{f' at {address}' if address else ''}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ray
