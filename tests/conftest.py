"""Suite-wide rules: in CI (CI=true), host and browser tests must run, so their skips count as failures."""

from __future__ import annotations

import os

import pytest

MUST_RUN_IN_CI = ("COMFYUI_PATH", "chromium", "playwright")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        reason = str(report.longrepr)
        if any(word in reason for word in MUST_RUN_IN_CI):
            report.outcome = "failed"
            report.longrepr = f"in CI the host and browser tests must run, not skip: {reason}"
