"""ComfyUI nodes of comfyui-xdit (V3 schema): thin translators from ComfyUI types to the pool.

ComfyUI imports this package relative to the plugin folder (``custom_nodes/comfyui-xdit``). The
engine (``comfyui_xdit``, folder ``comfyui_xdit/``) and the pool (``comfyui_xdit_workers``, folder
``workers/``) are top-level packages: installed with ``pip install -e .``, or, for a plain clone in
``custom_nodes/``, found next to this folder.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

WORKERS_PACKAGE = "comfyui_xdit_workers"  # the import name of the folder workers/


class _WorkersFolderFinder(importlib.abc.MetaPathFinder):
    """Finds ``comfyui_xdit_workers`` in the plugin's ``workers/`` folder (a plain copy is not installed)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib's protocol
        if fullname != WORKERS_PACKAGE:
            return None  # submodules are found through the package's __path__
        return importlib.util.spec_from_file_location(WORKERS_PACKAGE, os.path.join(self.folder, "__init__.py"),
                                                      submodule_search_locations=[self.folder])


def ensure_plugin_packages() -> None:
    """Make ``comfyui_xdit`` and ``comfyui_xdit_workers`` importable from a plain copy of the plugin folder.

    Nothing is imported here: the pool (which imports Ray) loads only when a node first needs it.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if importlib.util.find_spec("comfyui_xdit") is None and root not in sys.path:
        sys.path.append(root)
    if importlib.util.find_spec(WORKERS_PACKAGE) is None:
        sys.meta_path.append(_WorkersFolderFinder(os.path.join(root, "workers")))


ensure_plugin_packages()
