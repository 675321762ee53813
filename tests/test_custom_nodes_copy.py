"""The node pack loads from a plain copy in custom_nodes/ (how ComfyUI-Manager and `git clone` install it).

A second ComfyUI (no model) runs with a copy of the plugin's files instead of the link, and with the
editable install of this checkout hidden (run_without_editable.py): the copy must bring its engine
and pool packages itself. Needs COMFYUI_PATH; skips otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from comfy_host import ComfyHost, require_comfyui

RUNNER = Path(__file__).resolve().parent / "run_without_editable.py"


@pytest.fixture(scope="module")
def copy_host():
    require_comfyui()
    base = Path(tempfile.mkdtemp(prefix="xdit-copy-"))
    host = ComfyHost.start(base, plugin_mode="copy", with_model=False, python_prefix=[str(RUNNER)])
    try:
        yield host
    finally:
        host.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_pack_loads_from_a_plain_copy(copy_host: ComfyHost) -> None:
    plugin = copy_host.base_dir / "custom_nodes" / "comfyui-xdit"
    assert plugin.is_dir() and not plugin.is_symlink()
    info = copy_host.get_json("/object_info")
    for node_id in ("XDiTPool", "XDiTLoadModel", "XDiTParallelModel", "XDiTSampler", "XDiTSamplerAdvanced"):
        assert node_id in info, f"{node_id} missing:\n{copy_host.log_tail()}"
        assert info[node_id]["python_module"] == "custom_nodes.comfyui-xdit"
    log = copy_host.log_tail(200_000)
    assert "IMPORT FAILED" not in log and "Error while calling comfy_entrypoint" not in log, log
    assert copy_host.get_json("/xdit/pool/status") == {"pools": []}
    assert (plugin / "web" / "xdit.js").is_file()
    served = copy_host.get_json("/api/workflow_templates")
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))
    assert sorted(served.get("comfyui-xdit", [])) == shipped, served
