"""A broken host environment gets one clear message naming the package and the fix, in the CLI and in ComfyUI.

The failures are real: throwaway environments (``broken_env.py``) where torchaudio is a wheel built
for another torch, or where ray is missing. The test environment itself is untouched.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from broken_env import OLD_TORCHAUDIO, OLD_YUNCHANG, download_wheel, make_env
from comfy_host import ComfyHost, comfyui_path
from comfyui_xdit.environment import DEPENDENCIES, TESTED_TORCH_SET, _version_tuple, diagnose

REPO = Path(__file__).resolve().parent.parent
GENERATE = ["-m", "comfyui_xdit.cli", "generate", "--model", "tiny:flux", "--steps", "1", "--height", "64",
            "--width", "64"]


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="xdit-envs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def broken_torchaudio_python(workdir: Path) -> Path:
    wheel = download_wheel(OLD_TORCHAUDIO, workdir / "wheels")
    return make_env(workdir / "torchaudio-env", drop=["torchaudio"], add=[wheel])


@pytest.fixture(scope="module")
def no_ray_python(workdir: Path) -> Path:
    return make_env(workdir / "no-ray-env", drop=["ray"])


@pytest.fixture(scope="module")
def old_yunchang_python(workdir: Path) -> Path:
    wheel = download_wheel(OLD_YUNCHANG, workdir / "wheels")
    return make_env(workdir / "old-yunchang-env", drop=["yunchang"], add=[wheel])


def run(python: Path, args: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args, "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=str(REPO))


def test_healthy_environment_has_nothing_to_report() -> None:
    assert diagnose() is None


def test_tested_torch_set_is_the_lock_files() -> None:
    pins = {line.split(";")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")}
    assert set(TESTED_TORCH_SET) <= pins, (TESTED_TORCH_SET, sorted(p for p in pins if p.startswith("torch")))


def test_floors_are_declared_for_what_we_import() -> None:
    floors = {dep.distribution: dep.minimum for dep in DEPENDENCIES}
    assert floors["ray"] == "2.52" and floors["yunchang"] == "0.6" and floors["diffusers"] == "0.32"
    assert _version_tuple("2.14.1+cu130") == (2, 14, 1) and _version_tuple("0.6.4") > _version_tuple("0.6")
    assert _version_tuple("2.60.0") > _version_tuple("2.52") > _version_tuple("2.9.1")


def test_cli_names_a_torchaudio_built_for_another_torch(broken_torchaudio_python: Path, workdir: Path) -> None:
    proc = run(broken_torchaudio_python, GENERATE + ["--in-process"], workdir / "a.safetensors")
    assert proc.returncode == 4, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("comfyui-xdit:")]
    assert len(lines) == 1, proc.stderr
    assert "torchaudio 2.9.1" in lines[0] and 'pip install "torch==2.14.1"' in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not (workdir / "a.safetensors").exists()


def test_cli_names_missing_ray_and_runs_in_process_without_it(no_ray_python: Path, workdir: Path) -> None:
    proc = run(no_ray_python, GENERATE, workdir / "b.safetensors")
    assert proc.returncode == 4, proc.stderr
    assert "needs the Python package ray" in proc.stderr and 'pip install --upgrade "ray>=2.52"' in proc.stderr
    assert "Traceback" not in proc.stderr
    # The engine alone does not need Ray: --in-process still samples.
    proc = run(no_ray_python, GENERATE + ["--in-process"], workdir / "c.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "c.safetensors").is_file()


def test_cli_names_a_too_old_yunchang(old_yunchang_python: Path, workdir: Path) -> None:
    proc = run(old_yunchang_python, GENERATE + ["--in-process"], workdir / "d.safetensors")
    assert proc.returncode == 4, proc.stderr
    assert "needs yunchang >= 0.6, this Python has 0.5.1" in proc.stderr, proc.stderr
    assert 'pip install --upgrade "yunchang>=0.6"' in proc.stderr and "Traceback" not in proc.stderr


def test_comfyui_lists_the_nodes_and_running_one_names_the_broken_package(broken_torchaudio_python: Path,
                                                                          workdir: Path) -> None:
    if comfyui_path() is None:
        pytest.skip("needs COMFYUI_PATH pointing at a ComfyUI checkout (see README 'Host and browser tests')")
    base = workdir / "comfy"
    host = ComfyHost.start(base, with_model=False, python=str(broken_torchaudio_python))
    try:
        info = host.get_json("/object_info")
        for node_id in ("XDiTPool", "XDiTLoadModel", "XDiTSampler"):
            assert node_id in info, host.log_tail()
        prompt = {"pool": {"class_type": "XDiTPool", "inputs": {"ray_address": "", "network_interface": ""}},
                  "probe": {"class_type": "XDiTTestPoolProbe", "inputs": {"pool": ["pool", 0]}}}
        with host.connect() as ws:
            result = ws.run(prompt, timeout=120)
        (error,) = result.of_type("execution_error")
        assert error["node_id"] == "pool", error
        message = error["exception_message"]
        assert "torchaudio 2.9.1" in message and 'pip install "torch==2.14.1"' in message, message
        assert "BrokenEnvironment" in error["exception_type"], error
        assert host.alive
    finally:
        host.stop()
