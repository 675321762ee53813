"""Run ComfyUI's main.py as a user without ``pip install -e .`` of this repo would: the editable
finder and any path into this checkout are removed before ComfyUI starts, so the plugin copy in
custom_nodes/ must bring its own packages. Usage: python run_without_editable.py MAIN.py ARGS..."""

import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_checkout(path: str) -> bool:
    """A path into this checkout's sources; a venv that happens to live inside it (CI's .venv-test) is not."""
    path = os.path.abspath(path)
    inside = path == REPO or path.startswith(REPO + os.sep)
    return inside and not path.startswith(os.path.abspath(sys.prefix) + os.sep)


def main() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")
                        and "editable" not in type(f).__module__ and "editable" not in repr(f)]
    script = os.path.abspath(sys.argv[1])
    sys.path[:] = [os.path.dirname(script)] + [p for p in sys.path[1:] if p and not _in_checkout(p)]
    for name in [m for m in sys.modules if m.split(".")[0] in ("comfyui_xdit", "comfyui_xdit_workers")]:
        del sys.modules[name]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
