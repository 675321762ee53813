"""What `pip install` of this project puts at the top of site-packages: only names that are ours."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_installs_only_our_names_and_every_package(tmp_path: Path) -> None:
    source = tmp_path / "src"  # a copy: setuptools writes build/ and egg-info into the tree it builds
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info",
                                                                "__pycache__", "*.safetensors"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                   check=True, timeout=600)
    (wheel,) = tmp_path.glob("comfyui_xdit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"comfyui_xdit", "comfyui_xdit_workers"}, top  # no `workers`, no `nodes` (ComfyUI has one)
    # every package folder of the source tree is in the wheel (pyproject lists them by hand)
    for folder, installed in (("comfyui_xdit", "comfyui_xdit"), ("workers", "comfyui_xdit_workers")):
        for init in (REPO / folder).rglob("__init__.py"):
            package = init.parent.relative_to(REPO / folder)
            expected = "/".join([installed, *package.parts, "__init__.py"])
            assert expected in names, f"{expected} missing from the wheel: add it to [tool.setuptools] packages"
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "comfyui-xdit = comfyui_xdit.cli:main" in text
