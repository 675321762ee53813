"""A plain copy of the plugin (how ComfyUI-Manager and `git clone` install it: nothing pip-installed)
runs jobs on the embedded pool: its Ray workers cannot import our packages from site-packages, so the
pool ships them through Ray's runtime environment.

The copy runs in a throwaway environment (``broken_env.make_env``) that sees every dependency but not
this checkout's editable install; the copy's ``nodes`` package is imported as ComfyUI imports a custom
node folder, which makes ``comfyui_xdit`` and ``comfyui_xdit_workers`` importable in that process only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

from broken_env import make_env

REPO = Path(__file__).resolve().parent.parent

JOB = textwrap.dedent("""
    import importlib.util, os, sys
    root = sys.argv[1]
    spec = importlib.util.spec_from_file_location("custom_nodes.comfyui-xdit.nodes",
        os.path.join(root, "nodes", "__init__.py"), submodule_search_locations=[os.path.join(root, "nodes")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    import torch
    import comfyui_xdit, comfyui_xdit_workers
    assert comfyui_xdit.__file__.startswith(root) and comfyui_xdit_workers.__file__.startswith(root)
    from comfyui_xdit.model_loader import tiny_conditioning
    from comfyui_xdit.request import GenerationRequest, ModelRef
    from comfyui_xdit_workers import PoolSettings, XDiTPool
    ref = ModelRef("tiny:flux")
    positive, _ = tiny_conditioning(ref, 0)
    request = GenerationRequest(ref, torch.zeros(1, 16, 8, 8), positive, None, seed=3, steps=1)
    with XDiTPool(PoolSettings(embedded_num_cpus=1)) as pool:
        latent = pool.generate(request, timeout=300)
    print("LATENT", tuple(latent.shape), bool(torch.isfinite(latent).all()))
""")


def test_plain_copy_runs_a_job_on_the_embedded_pool(tmp_path: Path) -> None:
    copy = tmp_path / "custom_nodes" / "comfyui-xdit"
    copy.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("__init__.py", "nodes", "comfyui_xdit", "workers"):
        src = REPO / name
        (shutil.copytree(src, copy / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, copy / name))
    python = make_env(tmp_path / "env", hide=["comfyui_xdit", "comfyui-xdit", "__editable__"])
    script = tmp_path / "job.py"
    script.write_text(JOB)
    proc = subprocess.Popen([str(python), str(script), str(copy)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(tmp_path), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:  # the job's Ray daemons share its process group: none outlives the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert "LATENT (1, 16, 8, 8) True" in stdout, stdout[-3000:]
