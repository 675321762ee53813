"""Security of the Ray runtime the pool uses: token authentication always on, loopback where Ray allows.

Measured with Ray 2.60.0 (read in ``ray/_private/services.py``, ``parameter.py`` and the gcs/raylet
binaries): ``_node_ip_address="127.0.0.1"`` makes Ray advertise and connect over loopback and binds
the dashboard agent's HTTP port there, but the C++ gRPC servers (gcs_server, raylet, every core
worker) always bind all interfaces (``GetAllInterfacesIP()``: ``::``/``0.0.0.0``) and there is no
setting to change that; the dashboard agent's gRPC port and the runtime-env agent also listen beyond
loopback. What protects those ports is Ray's token authentication: every gRPC and HTTP call must
carry the cluster token (``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``). So the pool refuses to run
unless token authentication is on, and a test checks that every non-loopback listener of the
embedded runtime rejects a call without the token.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import InsecureCluster
from .settings import PoolSettings

AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK = "127.0.0.1"


def embedded_init_kwargs(settings: PoolSettings) -> dict[str, Any]:
    """``ray.init`` arguments for the embedded runtime: a new local instance, loopback, no dashboard."""
    kwargs: dict[str, Any] = {
        "address": "local",
        "_node_ip_address": LOOPBACK,
        "include_dashboard": False,
        "namespace": settings.namespace,
        "num_cpus": settings.embedded_num_cpus,
        "num_gpus": settings.embedded_num_gpus,
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
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def require_token_auth() -> None:
    """After connecting: fail when the runtime runs without token authentication."""
    if auth_mode() != "token":
        raise InsecureCluster("the Ray cluster runs without token authentication; start it with "
                              "RAY_AUTH_MODE=token (the default for `ray start` in Ray >= 2.60) and the "
                              "same token on every host")
