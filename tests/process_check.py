"""That a test module leaves no process behind: its rank processes, multiprocessing's helpers, nothing else.

Processes that were already running when the module started (another module's, the session's ComfyUI host)
are not the module's to judge; ``skip_comfy_host`` also ignores a ComfyUI host started during it and what
that host runs.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import psutil

from comfyui_xdit.parallel.launch import stop_helper_processes

MULTIPROCESSING_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def live_children(keep_helpers: bool = False, skip_comfy_host: bool = False) -> list[psutil.Process]:
    """Running processes under this test process; ``keep_helpers`` ignores multiprocessing's own helpers."""
    ours = psutil.Process(os.getpid()).children(recursive=True)
    skipped: set[int] = set()
    if skip_comfy_host:
        hosts = [p for p in ours if "main.py" in " ".join(p.cmdline()) and "--listen" in p.cmdline()]
        skipped = {p.pid for h in hosts for p in [h, *h.children(recursive=True)]}
    return [p for p in ours if p.pid not in skipped and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and not (keep_helpers and any(h in " ".join(p.cmdline()) for h in MULTIPROCESSING_HELPERS))]


@contextlib.contextmanager
def no_process_left(skip_comfy_host: bool = False) -> Iterator[None]:
    """Around a test module (a fixture's body): stop the launcher's helpers after it, then assert that no
    process it started is left."""
    before = {p.pid for p in live_children(skip_comfy_host=skip_comfy_host)}
    yield
    stop_helper_processes()
    left = [p.cmdline() for p in live_children(skip_comfy_host=skip_comfy_host) if p.pid not in before]
    assert left == [], f"processes left behind: {left}"
