"""Security of the Ray runtime the pool uses: token authentication always on, loopback when embedded.

Measured with Ray 2.60.0 (``ray/_private/worker.py``, ``services.py``, ``ray_constants.py``,
``dashboard/head.py``, ``autoscaler/_private/monitor.py``): ``ray.init(_node_ip_address="127.0.0.1")``
is not enough, because ``resolve_ip_for_localhost`` swaps loopback for the machine's address on
Linux, and every server then binds all interfaces (gcs_server, raylet and workers on ``::``, the
metrics servers on ``0.0.0.0``, the runtime-env agent on the machine's address). Ray keeps loopback
only when its cluster mode is off (``ENABLE_RAY_CLUSTER``, the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
switch it uses for laptops): then the node address stays 127.0.0.1, the C++ gRPC servers bind
loopback, and the metrics servers bind ``get_localhost_ip()``. ``loopback_runtime`` turns that mode
off for the duration of the embedded ``ray.init`` only (the children inherit it; later connections
to real clusters in this process are unaffected). On top of that, token authentication stays on
(Ray's default since 2.52: ``~/.ray/auth_token``); the pool refuses to start or join without it.
A test lists the listening sockets of every process of the embedded runtime and fails on any
non-loopback one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator, Optional, Sequence

from .errors import InsecureCluster
from .settings import PoolSettings

AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK = "127.0.0.1"
CLUSTER_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
CLUSTER_MODE_FLAG = "ENABLE_RAY_CLUSTER"

logger = logging.getLogger(__name__)


def ray_version() -> str:
    import ray

    return str(getattr(ray, "__version__", "?"))


def check_loopback(node_addresses: Sequence[str]) -> None:
    """``InsecureCluster`` unless every node of the embedded runtime has a loopback address (what
    ``loopback_runtime`` achieves; checked after start because it leans on Ray internals)."""
    exposed = sorted({a for a in node_addresses if not a.startswith("127.")})
    if exposed:
        raise InsecureCluster(f"the embedded Ray runtime (Ray {ray_version()}) took the address(es) {', '.join(exposed)} "
                              f"instead of 127.0.0.1, so its ports would be reachable from the network; comfyui-xdit "
                              f"is checked with Ray 2.60. Install ray==2.60.0, or run `ray start --head "
                              f"--node-ip-address=127.0.0.1` yourself and give the pool that address")


@contextlib.contextmanager
def loopback_runtime() -> Iterator[None]:
    """Within: a new local Ray node keeps 127.0.0.1 as its address, so its servers bind loopback."""
    from ray._private import ray_constants

    has_flag = hasattr(ray_constants, CLUSTER_MODE_FLAG)
    if not has_flag:  # a private constant of Ray 2.60; the env var alone still reaches child processes
        logger.warning("Ray %s has no ray_constants.%s (checked with Ray 2.60); the embedded runtime relies on %s=0 "
                       "and is checked for loopback-only addresses after it starts", ray_version(), CLUSTER_MODE_FLAG,
                       CLUSTER_MODE_ENV)
    saved_env, saved_flag = os.environ.get(CLUSTER_MODE_ENV), getattr(ray_constants, CLUSTER_MODE_FLAG, None)
    os.environ[CLUSTER_MODE_ENV] = "0"  # read by Ray's child processes
    if has_flag:
        setattr(ray_constants, CLUSTER_MODE_FLAG, False)  # read by this process (the env var was read at import)
    try:
        yield
    finally:
        if has_flag:
            setattr(ray_constants, CLUSTER_MODE_FLAG, saved_flag)
        if saved_env is None:
            os.environ.pop(CLUSTER_MODE_ENV, None)
        else:
            os.environ[CLUSTER_MODE_ENV] = saved_env


def embedded_init_kwargs(settings: PoolSettings, num_gpus: Optional[int] = None) -> dict[str, Any]:
    """``ray.init`` arguments for the embedded runtime: a new local instance, loopback, no dashboard, and
    ``num_gpus`` GPUs (the chosen ones; ``settings.embedded_num_gpus`` overrides)."""
    kwargs: dict[str, Any] = {
        "address": "local",
        "_node_ip_address": LOOPBACK,
        "include_dashboard": False,
        "namespace": settings.namespace,
        "num_cpus": settings.embedded_num_cpus,
        "num_gpus": settings.embedded_num_gpus if settings.embedded_num_gpus is not None else num_gpus,
    }
    if settings.system_config:
        kwargs["_system_config"] = dict(settings.system_config)
    return kwargs


def refuse_disabled_auth() -> None:
    """Before starting or joining Ray: the user must not have switched authentication off."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        raise InsecureCluster(f"{AUTH_MODE_ENV}=disabled switches Ray's token authentication off; the pool "
                              f"runs arbitrary code on every worker and will not run without it. Unset "
                              f"{AUTH_MODE_ENV} (or set it to 'token') and share ~/.ray/auth_token with the hosts")


def auth_mode() -> str:
    """The authentication mode this process's Ray connection uses: 'token' or 'disabled'."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError as exc:  # private in Ray 2.60: decide as Ray documents it (token unless switched off)
        mode = "disabled" if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled" else "token"
        logger.warning("Ray %s no longer has ray._raylet.get_authentication_mode (%s; checked with Ray 2.60); taking "
                       "the mode from %s: %s", ray_version(), exc, AUTH_MODE_ENV, mode)
        return mode
    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def require_token_auth() -> None:
    """After connecting: fail when the runtime runs without token authentication."""
    if auth_mode() != "token":
        raise InsecureCluster("the Ray cluster runs without token authentication; start it with "
                              "RAY_AUTH_MODE=token (the default for `ray start` in Ray >= 2.60) and the "
                              "same token on every host")
