"""Harness for tests against a real ComfyUI host (found through ``COMFYUI_PATH``).

``ComfyHost.start`` runs ``python main.py --cpu --listen 127.0.0.1 --port N --base-directory TMP``
with the plugin linked (or copied) into ``TMP/custom_nodes`` and, when asked, the smallest Flux file
stock ComfyUI loads in ``TMP/models/diffusion_models``. One shared host serves every test module of
a session (``shared_host``); it is stopped, with every process it started (Ray included), at the end
of the session, at interpreter exit, and by the kernel if pytest itself dies.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pytest

logger = logging.getLogger(__name__)

PLUGIN_ROOT = Path(__file__).resolve().parent.parent
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"
MODEL_NAME = "flux-comfy-min.safetensors"
START_TIMEOUT_S = 180
PLUGIN_FILES = ("__init__.py", "nodes", "web", "comfyui_xdit", "workers", "example_workflows",
                "requirements.txt", "pyproject.toml", "README.md")


def comfyui_path() -> Optional[Path]:
    """The ComfyUI checkout from ``COMFYUI_PATH``, or None when unset or not a ComfyUI tree."""
    value = os.environ.get("COMFYUI_PATH")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    return path if (path / "main.py").is_file() else None


def require_comfyui() -> Path:
    path = comfyui_path()
    if path is None:
        pytest.skip("ComfyUI host tests need COMFYUI_PATH pointing at a ComfyUI checkout (main.py); "
                    f"got {os.environ.get('COMFYUI_PATH')!r}. See README 'Host and browser tests'.")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """preexec: the kernel sends SIGTERM to the server if pytest dies (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# Stock-loadable tiny files of the families after Flux: file name -> (tiny model name (models/families.py),
# stored dtype). Qwen-Image's is the smallest stock ComfyUI loads (one full-width block, ~0.8 GB in bf16).
FAMILY_FILES = {"sd3-tiny.safetensors": ("sd3", "float32"),
                "qwen-image-min.safetensors": ("qwen-image-comfy-min", "bfloat16"),
                "pixart-sigma-tiny.safetensors": ("pixart-sigma", "float32"),
                "pixart-alpha-tiny.safetensors": ("pixart-alpha", "float32")}
FAMILY_FILES["hunyuan-dit-tiny.safetensors"] = ("hunyuan-dit", "float32")  # v1.1/1.2 (ComfyUI's HunyuanDiT)
FAMILY_FILES["wan21-tiny.safetensors"] = ("wan21", "float32")  # Wan 2.1 T2V (ComfyUI's WAN21)
FAMILY_FILES["wan21-i2v-tiny.safetensors"] = ("wan21-i2v", "float32")  # Wan 2.1 I2V (ComfyUI's WAN21_I2V)
FAMILY_FILES["hunyuan-video-tiny.safetensors"] = ("hunyuan-video", "float32")  # HunyuanVideo T2V (ComfyUI's)
FAMILY_FILES["wan22-5b-tiny.safetensors"] = ("wan22-5b", "float32")  # Wan 2.2 TI2V 5B (ComfyUI's WAN22_T2V)
FAMILY_FILES["hunyuan-video-i2v-tiny.safetensors"] = ("hunyuan-video-i2v", "float32")  # ComfyUI's HunyuanVideoI2V
FAMILY_FILES["hunyuan-video-v2-tiny.safetensors"] = ("hunyuan-video", "float32")  # its v2 (replace) I2V use
# Tiny files of families stock ComfyUI cannot load (only XDiTLoadModel does): same layout, written beside them
LOADER_ONLY_FILES = {"cogvideox-tiny.safetensors": ("cogvideox", "float32")}  # CogVideoX (diffusers' layout)


def write_model(models_dir: Path) -> Path:
    """The smallest Flux stock ComfyUI loads (random, seeded, bf16, ~1.1 GB) and the tiny files of the
    other families (``FAMILY_FILES``); each written once per folder."""
    import torch

    from comfyui_xdit.models.families import TINY_SPECS, write_random_model
    from comfyui_xdit.models.flux_checkpoint import COMFY_MIN_FLUX

    folder = models_dir / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec, dtype in [(MODEL_NAME, COMFY_MIN_FLUX, torch.bfloat16),
                              *((file, TINY_SPECS[tiny], getattr(torch, dtype))
                                for file, (tiny, dtype) in {**FAMILY_FILES, **LOADER_ONLY_FILES}.items())]:
        target = folder / name
        if not target.exists():
            partial = target.with_suffix(".partial")
            write_random_model(partial, spec, seed=0, dtype=dtype)
            partial.rename(target)
    return folder / MODEL_NAME


def install_plugin(custom_nodes: Path, mode: str) -> Path:
    """Put the plugin into ``custom_nodes``: a symlink to this checkout, or a plain copy of its files."""
    target = custom_nodes / "comfyui-xdit"
    if mode == "symlink":
        target.symlink_to(PLUGIN_ROOT, target_is_directory=True)
    elif mode == "copy":
        target.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in PLUGIN_FILES:
            src = PLUGIN_ROOT / name
            if src.is_dir():
                shutil.copytree(src, target / name, ignore=ignore)
            elif src.exists():
                shutil.copy2(src, target / name)
    else:
        raise ValueError(f"plugin mode must be 'symlink' or 'copy', got {mode!r}")
    return target


class ComfyHost:
    """A running ComfyUI server plus small HTTP and websocket helpers."""

    def __init__(self, base_dir: Path, port: int, proc: subprocess.Popen, log_path: Path) -> None:
        self.base_dir = base_dir
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, base_dir: Path, plugin_mode: str = "symlink", with_model: bool = True,
              extra_args: Iterable[str] = (), python_prefix: Iterable[str] = (),
              python: str = sys.executable) -> "ComfyHost":
        comfy = require_comfyui()
        custom_nodes = base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        install_plugin(custom_nodes, plugin_mode)
        (custom_nodes / "xdit_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
        if with_model:
            write_model(base_dir / "models")
        port = free_port()
        log_path = base_dir / "comfyui.log"
        cmd = [python, *python_prefix, str(comfy / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--base-directory", str(base_dir), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
        log = open(log_path, "wb")
        proc = subprocess.Popen(cmd, cwd=str(comfy), stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        host = cls(base_dir, port, proc, log_path)
        atexit.register(host.stop)
        try:
            host.wait_ready()
        except BaseException:
            host.stop()
            raise
        return host

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGINT (ComfyUI and Ray shut down cleanly), then SIGKILL whatever of the tree is left."""
        if self.proc.poll() is None:
            import psutil

            try:
                tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            for child in tree:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(tree, timeout=10)
        try:  # the process group too: anything started with the server's session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- HTTP ---------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, payload: Any, timeout: float = 30) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if body else None
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except json.JSONDecodeError:
                return err.code, body.decode(errors="replace")

    def queue(self, prompt: dict, client_id: str) -> tuple[int, Any]:
        return self.post_json("/prompt", {"prompt": prompt, "client_id": client_id})

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def connect(self) -> "HostSocket":
        return HostSocket(self)


class HostSocket:
    """The ComfyUI websocket of one client id; collects JSON messages and counts binary previews."""

    def __init__(self, host: ComfyHost) -> None:
        import websocket

        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={self.client_id}",
                                              timeout=5)
        self.host = host

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> "HostSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, prompt: dict, timeout: float = 240,
            on_message: Optional[Callable[[dict], None]] = None) -> "RunResult":
        """Queue ``prompt`` and read messages until it finishes (success, error or interruption)."""
        status, body = self.host.queue(prompt, self.client_id)
        if status != 200:
            return RunResult(None, [], 0, status, body)
        prompt_id = body["prompt_id"]
        return self.collect(prompt_id, timeout, on_message)

    def collect(self, prompt_id: str, timeout: float,
                on_message: Optional[Callable[[dict], None]] = None) -> "RunResult":
        import websocket

        messages: list[dict] = []
        previews = 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.host.alive:
                raise RuntimeError(f"ComfyUI died:\n{self.host.log_tail()}")
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(frame, bytes):
                previews += 1
                continue
            msg = json.loads(frame)
            data = msg.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            messages.append(msg)
            if on_message is not None:
                on_message(msg)
            kind = msg["type"]
            done = (kind in ("execution_error", "execution_interrupted", "execution_success")
                    or (kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id))
            if done:
                return RunResult(prompt_id, messages, previews, 200, None)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s; messages: "
                           f"{[m['type'] for m in messages]}\n{self.host.log_tail()}")


class RunResult:
    def __init__(self, prompt_id: Optional[str], messages: list[dict], previews: int, status: int,
                 body: Any) -> None:
        self.prompt_id = prompt_id
        self.messages = messages
        self.previews = previews
        self.status = status  # HTTP status of /prompt (400 = validation error)
        self.body = body

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    @property
    def succeeded(self) -> bool:
        return self.status == 200 and bool(self.of_type("execution_success"))

    def describe(self) -> str:
        errors = self.of_type("execution_error")
        return f"status={self.status} body={self.body} types={[m['type'] for m in self.messages]} errors={errors}"


_SHARED: dict[str, ComfyHost] = {}


def shared_host(config: pytest.Config) -> ComfyHost:
    """The session's ComfyUI host (plugin linked, model present, latent previews on), started once."""
    require_comfyui()
    host = _SHARED.get("host")
    if host is not None and host.alive:
        return host
    base = Path(tempfile.mkdtemp(prefix="xdit-comfy-"))
    host = ComfyHost.start(base, extra_args=("--preview-method", "latent2rgb"))
    _SHARED["host"] = host

    def cleanup() -> None:
        host.stop()
        _SHARED.pop("host", None)
        shutil.rmtree(base, ignore_errors=True)

    config.add_cleanup(cleanup)
    return host


@pytest.fixture(scope="module")
def comfy_host(request: pytest.FixtureRequest) -> ComfyHost:
    """Module fixture over the session's shared host (stopped at the end of the session)."""
    return shared_host(request.config)
