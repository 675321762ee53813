"""``comfyui-xdit pool status`` and pool errors from the CLI (``generate`` on the pool: test_cli.py)."""

import socket
import subprocess
import sys


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "comfyui_xdit.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_unreachable_address_is_one_line_exit_3() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _cli("pool", "status", "--address", f"127.0.0.1:{port}")
    assert result.returncode == 3, result.stderr
    assert f"cannot reach the Ray head at 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_pool_status_lists_this_host_and_auth() -> None:
    result = _cli("pool", "status")
    assert result.returncode == 0, result.stderr
    assert "(embedded, this machine only), authentication: token" in result.stdout
    assert "hosts: 1" in result.stdout and "(head)" in result.stdout
