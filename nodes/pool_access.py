"""The one place nodes reach the worker pool: a registry of live pools keyed by their settings.

Pools are persistent (warm actors, models loaded once), so a pool outlives the prompt that made it;
the registry owns them and shuts them down when ComfyUI exits. Nodes never touch Ray themselves.
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import Any, Optional

from comfyui_xdit.environment import require_environment

from .handles import PoolHandle

logger = logging.getLogger(__name__)


class PoolUnavailable(RuntimeError):
    """The worker pool package is missing or cannot start; the message says why."""


def _workers():
    require_environment()  # a broken ray/torch/diffusers is named with its fix, not as an ImportError
    try:
        import comfyui_xdit_workers
    except ImportError as exc:
        raise PoolUnavailable(f"the xDiT worker pool (package comfyui_xdit_workers) cannot be imported: {exc}; "
                              "install the plugin's requirements.txt") from exc
    return comfyui_xdit_workers


def comfyui_gpu() -> Optional[int]:
    """The cuda ordinal ComfyUI computes on (its text encoders and VAE), None on CPU or outside ComfyUI."""
    try:
        import comfy.model_management as model_management
    except ImportError:
        return None
    device = model_management.get_torch_device()
    if getattr(device, "type", None) != "cuda":
        return None
    return device.index if device.index is not None else 0


def pool_settings(handle: PoolHandle):
    """``PoolHandle`` -> the pool's own settings object."""
    from comfyui_xdit_workers.gpu_choice import parse_gpus

    return _workers().PoolSettings(address=handle.address, network_interface=handle.network_interface,
                                   gpus=parse_gpus(handle.gpus), host_gpu=comfyui_gpu())


class PoolRegistry:
    """Live pools by ``PoolHandle``; created on first use, shut down at exit."""

    def __init__(self) -> None:
        self._pools: dict[PoolHandle, Any] = {}
        self._lock = threading.Lock()
        self._atexit_registered = False

    def get(self, handle: PoolHandle) -> Any:
        """The pool for ``handle``, starting it (and Ray) the first time."""
        with self._lock:
            pool = self._pools.get(handle)
            if pool is None:
                logger.info("starting xDiT pool on %s", handle.describe())
                pool = _workers().XDiTPool(pool_settings(handle)).start()
                self._pools[handle] = pool
                if not self._atexit_registered:
                    atexit.register(self.shutdown_all)
                    self._atexit_registered = True
            return pool

    def status(self) -> list[dict]:
        """One entry per pool: where it is and what the pool reports (hosts, devices, state)."""
        with self._lock:
            items = list(self._pools.items())
        report = []
        for handle, pool in items:
            entry: dict[str, Any] = {"address": handle.address or "embedded", "network_interface":
                                     handle.network_interface, "gpus": handle.gpus}
            try:
                entry["status"] = _jsonable(pool.status())
            except Exception as exc:  # a broken pool is reported, not raised, by the status route
                logger.warning("pool %s status failed: %s", handle.describe(), exc)
                entry["error"] = f"{type(exc).__name__}: {exc}"
            report.append(entry)
        return report

    def shutdown_all(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            try:
                pool.shutdown()
            except Exception as exc:  # shutting down at exit: log and go on with the others
                logger.warning("xDiT pool shutdown failed: %s", exc)


def _jsonable(value: Any) -> Any:
    """Status objects (dataclasses, tuples, enums) as plain JSON data."""
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    return str(value)


_registry: Optional[PoolRegistry] = None
_registry_lock = threading.Lock()


def registry() -> PoolRegistry:
    """The plugin's registry (one per ComfyUI process, created on first use)."""
    global _registry
    with _registry_lock:
        if _registry is None:
            _registry = PoolRegistry()
        return _registry
