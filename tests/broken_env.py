"""Throwaway Python environments with one dependency really broken, to test what users see.

``make_env`` creates a virtual environment (no pip) whose site-packages links every entry of the
test environment's own, minus the distributions named in ``drop``, plus the wheels in ``add``
unpacked as they are: a torchaudio built for another torch fails to import for real, a dropped ray
is really missing. The test environment itself is never touched.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Iterable

# A real torchaudio built for an older torch (2.9): next to torch 2.14 its library fails to load.
OLD_TORCHAUDIO = "torchaudio==2.9.1"
OLD_YUNCHANG = "yunchang==0.5.1"  # below our floor of 0.6


def _distribution_of(entry: str) -> str:
    """'ray-2.60.0.dist-info' -> 'ray'; 'ray' -> 'ray'; '__editable__.x.pth' -> that name."""
    for suffix in (".dist-info", ".egg-info"):
        if entry.endswith(suffix):
            return entry[: -len(suffix)].rsplit("-", 1)[0].lower().replace("_", "-")
    return entry.lower().replace("_", "-")


def download_wheel(requirement: str, folder: Path) -> Path:
    """One binary wheel for this Python from the package registry (no dependencies)."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                    str(folder), requirement], check=True, timeout=300)
    name = requirement.split("==")[0]
    (wheel,) = sorted(folder.glob(f"{name}-*.whl"))
    return wheel


def make_env(target: Path, drop: Iterable[str] = (), add: Iterable[Path] = (), hide: Iterable[str] = ()) -> Path:
    """A venv at ``target`` seeing this environment's packages except ``drop`` (distribution names) and
    entries whose name contains one of ``hide``, plus wheels ``add``; returns its python."""
    dropped = {name.lower() for name in drop}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120)
    here = Path(sysconfig.get_paths()["purelib"])
    python = target / "bin" / "python"
    there = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True, timeout=60).stdout.strip())
    for entry in here.iterdir():
        if _distribution_of(entry.name) in dropped or entry.name == "__pycache__" or any(h in entry.name for h in hide):
            continue
        (there / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    for wheel in add:
        name = wheel.name.split("-")[0].lower()
        assert name in dropped, f"drop {name} before adding a wheel of it"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(there)
    return python
