"""ComfyUI nodes of comfyui-xdit (V3 schema): thin translators from ComfyUI types to the pool.

ComfyUI imports this package relative to the plugin folder (``custom_nodes/comfyui-xdit``). The
engine (``comfyui_xdit``) and the pool (``workers``) are top-level packages: installed with
``pip install -e .``, or, for a plain clone in ``custom_nodes/``, found next to this folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def ensure_plugin_packages() -> None:
    """Make ``comfyui_xdit`` and ``workers`` importable from a plain copy of the plugin folder."""
    if importlib.util.find_spec("comfyui_xdit") is not None and importlib.util.find_spec("workers") is not None:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)


ensure_plugin_packages()
