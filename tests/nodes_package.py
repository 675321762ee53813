"""Our ``nodes/`` package imported under another name, for tests: ComfyUI's own top-level ``nodes``
module may be importable (the same name and loading as ``tests/test_nodes_unit.py`` uses)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = "xdit_nodes_under_test"


def nodes_module(submodule: str):
    """``nodes.<submodule>`` of this checkout, e.g. ``nodes_module("model_patches")``."""
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(NAME, ROOT / "nodes" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "nodes")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{NAME}.{submodule}")
