"""Is the host Python able to run us? One message naming the broken package and the command that fixes it.

ComfyUI users' environments drift: a torchaudio built for another torch makes ``import torchaudio``
fail, transformers imports torchaudio while diffusers loads its single-file loaders, and then
``from diffusers import FluxTransformer2DModel`` fails with "Could not import module
'AutoImageProcessor'", far from the cause. ``diagnose`` imports our dependencies in dependency order
and reports the first that is missing, too old or broken, so the nodes (which still load and list
themselves) and the CLI can say what to do instead of showing a traceback.

Nothing is imported when this module is imported; ``diagnose`` does the imports.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

# The torch / torchvision / torchaudio set the tests run with (constraints.txt; a test keeps them equal).
TESTED_TORCH_SET = ("torch==2.14.1", "torchvision==0.29.1", "torchaudio==2.11.0")

ENGINE = "engine"  # what sampling on a rank needs
POOL = "pool"  # what the Ray worker pool needs


class BrokenEnvironment(RuntimeError):
    """A dependency is missing, too old or fails to import; the message names it and the fix."""


@dataclass(frozen=True)
class Dependency:
    """One package we import: its distribution name, what to import to prove it works, its floor."""

    distribution: str
    probe: str  # module imported (``module:attribute`` also fetches the attribute)
    minimum: Optional[str]
    part: str  # ENGINE or POOL
    optional: bool = False  # only checked when installed (torchvision/torchaudio: ComfyUI's, not ours)


# In import order: a package is blamed only when everything it imports was fine.
DEPENDENCIES = (
    Dependency("torch", "torch", "2.4", ENGINE),
    Dependency("torchvision", "torchvision", None, ENGINE, optional=True),
    Dependency("torchaudio", "torchaudio", None, ENGINE, optional=True),
    Dependency("safetensors", "safetensors.torch", "0.4", ENGINE),
    Dependency("transformers", "transformers", None, ENGINE, optional=True),
    Dependency("diffusers", "diffusers:FluxTransformer2DModel", "0.32", ENGINE),
    Dependency("yunchang", "yunchang.ring.utils:update_out_and_lse", "0.6", ENGINE),
    Dependency("ray", "ray", "2.52", POOL),  # token authentication on by default from 2.52 (security.py)
)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def installed_version(distribution: str) -> Optional[str]:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _torch_set_fix() -> str:
    return "pip install " + " ".join(f'"{pin}"' for pin in TESTED_TORCH_SET)


def fix_command(dep: Dependency) -> str:
    """The command that repairs ``dep`` in ComfyUI's Python (run it with that Python's pip)."""
    name = dep.distribution
    if name in ("torchvision", "torchaudio"):
        # A torchvision/torchaudio built for another torch: install a set that imports together.
        return f"{_torch_set_fix()} (a torch/torchvision/torchaudio set that imports together)"
    if name == "torch":
        return f"pip install --force-reinstall {_torch_set_fix()[len('pip install '):]}"
    if name in ("diffusers", "transformers"):
        return 'pip install --upgrade "diffusers>=0.32" "transformers>=4.37"'
    floor = f">={dep.minimum}" if dep.minimum else ""
    return f'pip install --upgrade "{name}{floor}"'


def _probe(dep: Dependency) -> None:
    module_name, _, attribute = dep.probe.partition(":")
    module = importlib.import_module(module_name)
    if attribute:
        getattr(module, attribute)


def _cause(exc: BaseException) -> str:
    """The innermost message of an exception chain, on one line."""
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = f"{type(seen).__name__}: {seen}".strip()
    return " ".join(text.split())[:400]


def diagnose(parts: Sequence[str] = (ENGINE, POOL)) -> Optional[str]:
    """None when every dependency of ``parts`` imports and meets its floor; else one message naming the
    first broken package, why, and the command that fixes it."""
    versions: dict[str, Optional[str]] = {}
    for dep in DEPENDENCIES:
        if dep.part not in parts:
            continue
        version = versions[dep.distribution] = installed_version(dep.distribution)
        if version is None:
            if dep.optional:
                continue
            return (f"comfyui-xdit needs the Python package {dep.distribution}, which is not installed in this "
                    f"Python. Fix: {fix_command(dep)}")
        if dep.minimum and _version_tuple(version) < _version_tuple(dep.minimum):
            return (f"comfyui-xdit needs {dep.distribution} >= {dep.minimum}, this Python has {version}. "
                    f"Fix: {fix_command(dep)}")
        try:
            _probe(dep)
        except Exception as exc:  # any import failure is the finding; report it, never re-raise deep errors
            logger.debug("probe of %s failed", dep.distribution, exc_info=True)
            beside = f" next to torch {versions.get('torch')}" if dep.distribution != "torch" else ""
            return (f"comfyui-xdit cannot run: {dep.distribution} {version} is installed but fails to import{beside} "
                    f"({_cause(exc)}). Fix: {fix_command(dep)}")
    return None


def require_environment(parts: Sequence[str] = (ENGINE, POOL)) -> None:
    """Raise ``BrokenEnvironment`` with ``diagnose``'s message when something is broken."""
    problem = diagnose(parts)
    if problem is not None:
        raise BrokenEnvironment(problem)
