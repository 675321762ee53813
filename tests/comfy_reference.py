"""ComfyUI's own functions as references, imported from the checkout that COMFYUI_PATH names.

ComfyUI is never copied into this repository; without COMFYUI_PATH these tests skip with the reason.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest

SKIP_REASON = ("COMFYUI_PATH is not set to a ComfyUI checkout (v0.3.64); set it to compare against "
               "ComfyUI's own functions (CI sets it to ../shared/ComfyUI)")


def comfy_path() -> str | None:
    path = os.environ.get("COMFYUI_PATH")
    return path if path and os.path.isfile(os.path.join(path, "comfy", "samplers.py")) else None


def import_comfy(module: str):
    """Import a ComfyUI module (``comfy.samplers`` ...) or skip the test with a clear reason."""
    path = comfy_path()
    if path is None:
        pytest.skip(SKIP_REASON)
    if path not in sys.path:
        sys.path.insert(0, path)
    cli_args = importlib.import_module("comfy.cli_args")
    cli_args.args.cpu = True  # as `main.py --cpu`: no CUDA probing on machines without a GPU
    return importlib.import_module(module)
