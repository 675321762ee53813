"""Library versions per host, and the check that every host runs the same ones."""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Mapping, Sequence

from .errors import VersionSkew

CHECKED = ("torch", "diffusers")  # plus comfyui_xdit.__version__ (shipped code has no metadata)


def host_versions() -> dict[str, str]:
    import comfyui_xdit

    out = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "comfyui-xdit": comfyui_xdit.__version__}
    for name in CHECKED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def check_versions(local: Mapping[str, str], remote: Sequence[tuple[str, Mapping[str, str]]]) -> None:
    """Raise ``VersionSkew`` naming each host whose versions differ from this machine's."""
    problems = []
    for host, versions in remote:
        diffs = [f"{k} {versions.get(k)} (here {v})" for k, v in local.items() if versions.get(k) != v]
        if diffs:
            problems.append(f"{host}: {', '.join(diffs)}")
    if problems:
        raise VersionSkew("hosts run different library versions than this machine; install the same "
                          "torch/diffusers/comfyui-xdit/python everywhere: " + "; ".join(problems))
