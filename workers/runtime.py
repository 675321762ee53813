"""Start the embedded Ray runtime or join a cluster by address, with clear errors and a timeout."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import socket
import tempfile
from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from .errors import PoolUnreachable
from .gpu_choice import GpuPlan, local_gpu_plan, only_these_gpus
from .security import (check_loopback, embedded_init_kwargs, loopback_runtime, refuse_disabled_auth,
                       require_token_auth)
from .settings import PoolSettings

logger = logging.getLogger(__name__)

DEFAULT_GCS_PORT = 6379
DISTRIBUTION = "comfyui-xdit"


@dataclass(frozen=True)
class RayRuntime:
    """The Ray connection the pool uses; ``owned`` when the pool started it and must stop it; ``gpus``
    what the embedded runtime was given (None when joined or reused)."""

    address: str
    owned: bool
    gpus: Optional[GpuPlan] = None


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


def staged_package(folder: str, name: str) -> str:
    """A directory named ``name`` holding ``folder``'s Python files, for Ray's ``py_modules`` (which imports
    a directory by its base name): ``folder`` itself when the names agree, else a copy kept by content."""
    if os.path.basename(os.path.normpath(folder)) == name:
        return folder
    files = sorted(p for p in pathlib.Path(folder).rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    base = pathlib.Path(tempfile.gettempdir()) / "comfyui-xdit-code"
    target = base / digest.hexdigest()[:16] / name
    if not target.is_dir():
        base.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(dir=base))  # renamed into place whole: never half-written
        for path in files:
            out = staging / name / path.relative_to(folder)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
        try:
            staging.rename(target.parent)
        except OSError:  # another process staged the same content first
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def installed() -> bool:
    """Whether this Python has comfyui-xdit installed (pip, editable or not), so that Ray's worker processes
    import our packages as this process does. A plain copy in ComfyUI's custom_nodes is not installed."""
    try:
        metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    return True


def code_runtime_env() -> dict:
    """Ship our two packages to remote hosts so they need only the dependencies installed. The pool's
    folder is ``workers/``; it is shipped under its import name ``comfyui_xdit_workers``."""
    import comfyui_xdit
    import comfyui_xdit_workers

    workers_folder = os.path.dirname(comfyui_xdit_workers.__file__)
    return {"py_modules": [os.path.dirname(comfyui_xdit.__file__),
                           staged_package(workers_folder, comfyui_xdit_workers.__name__)]}


def start_or_join(settings: PoolSettings) -> RayRuntime:
    """Connect this process to Ray: reuse a connection made by someone else, else start or join one."""
    import ray

    refuse_disabled_auth()
    if ray.is_initialized():
        logger.info("reusing the Ray connection this process already has")
        require_token_auth()
        return RayRuntime(address=str(ray.get_runtime_context().gcs_address), owned=False)
    ship = settings.sends_code or (settings.ship_code is None and not installed())
    if ship and not settings.sends_code:
        logger.info("comfyui-xdit is not installed in this Python (a plain copy in custom_nodes): the pool ships "
                    "its code to the workers")
    runtime_env = code_runtime_env() if ship else None
    plan = None
    if settings.embedded:
        plan = local_gpu_plan(settings.gpus, settings.host_gpu)
        logger.info("embedded pool GPUs: %s", plan.describe())
        with loopback_runtime(), only_these_gpus(plan):
            ray.init(**embedded_init_kwargs(settings, len(plan.ordinals)), runtime_env=runtime_env)
        try:
            check_loopback([str(n.get("NodeManagerAddress", "")) for n in ray.nodes()])
        except Exception:
            ray.shutdown()
            raise
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
    return RayRuntime(address=address, owned=True, gpus=plan)
