"""Start the embedded Ray runtime or join a cluster by address, with clear errors and a timeout."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from .errors import PoolUnreachable
from .security import embedded_init_kwargs, loopback_runtime, refuse_disabled_auth, require_token_auth
from .settings import PoolSettings

logger = logging.getLogger(__name__)

DEFAULT_GCS_PORT = 6379


@dataclass(frozen=True)
class RayRuntime:
    """The Ray connection the pool uses; ``owned`` when the pool started it and must stop it."""

    address: str
    owned: bool


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host:
        return address, DEFAULT_GCS_PORT
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"pool address must be HOST:PORT (e.g. 192.168.1.10:6379), got {address!r}") from None


def probe(address: str, timeout_s: float) -> None:
    """Fail fast with ``PoolUnreachable`` when nothing answers at the head's GCS port."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise PoolUnreachable(
            f"cannot reach the Ray head at {host}:{port} ({exc}). Start it on that machine with "
            f"`ray start --head --port={port}`, check the address and that the port is open on the "
            f"private network, or leave the address empty for the embedded local pool") from exc


def code_runtime_env() -> dict:
    """Ship our two packages to remote hosts so they need only the dependencies installed."""
    import comfyui_xdit
    import workers

    return {"py_modules": [os.path.dirname(comfyui_xdit.__file__), os.path.dirname(workers.__file__)]}


def start_or_join(settings: PoolSettings) -> RayRuntime:
    """Connect this process to Ray: reuse a connection made by someone else, else start or join one."""
    import ray

    refuse_disabled_auth()
    if ray.is_initialized():
        logger.info("reusing the Ray connection this process already has")
        require_token_auth()
        return RayRuntime(address=str(ray.get_runtime_context().gcs_address), owned=False)
    runtime_env = code_runtime_env() if settings.sends_code else None
    if settings.embedded:
        with loopback_runtime():
            ray.init(**embedded_init_kwargs(settings), runtime_env=runtime_env)
    else:
        probe(settings.address, settings.timeouts.connect_s)
        ray.init(address=settings.address, namespace=settings.namespace, runtime_env=runtime_env)
    try:
        require_token_auth()
    except Exception:
        ray.shutdown()
        raise
    address = str(ray.get_runtime_context().gcs_address)
    logger.info("pool connected to Ray at %s (%s)", address, "embedded" if settings.embedded else "cluster")
    return RayRuntime(address=address, owned=True)
