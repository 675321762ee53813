"""Suite-wide rules: in CI (CI=true), host and browser tests must run, so their skips count as failures;
every local gloo run obeys NCCL's rules (``comfyui_xdit/parallel/nccl_semantics.py``)."""

from __future__ import annotations

import os

import pytest

MUST_RUN_IN_CI = ("COMFYUI_PATH", "chromium", "playwright")
NCCL_SEMANTICS_ENV = "COMFYUI_XDIT_NCCL_SEMANTICS"  # read by run_ranks and by gloo pool workers
NCCL_WAIT_ENV = "COMFYUI_XDIT_NCCL_WAIT_S"
SUITE_WAIT_BOUND_S = "120"  # a stage may wait this long for its neighbour with 8 ranks on 2 cores


@pytest.fixture(scope="session", autouse=True)
def nccl_semantics_everywhere():
    """Ranks started with ``run_ranks`` enforce NCCL's point-to-point and ordering rules on gloo, so a
    schedule that only gloo's buffering lets finish fails a test here instead of hanging on GPUs."""
    saved = {name: os.environ.get(name) for name in (NCCL_SEMANTICS_ENV, NCCL_WAIT_ENV)}
    os.environ[NCCL_SEMANTICS_ENV] = "1"
    os.environ.setdefault(NCCL_WAIT_ENV, SUITE_WAIT_BOUND_S)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


SLOW_ENV = "XDIT_SLOW_TESTS"  # 1: also run the tests marked slow


def pytest_collection_modifyitems(config, items):
    if os.environ.get(SLOW_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"slow suite: opt in with {SLOW_ENV}=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped:
        reason = str(report.longrepr)
        if any(word in reason for word in MUST_RUN_IN_CI):
            report.outcome = "failed"
            report.longrepr = f"in CI the host and browser tests must run, not skip: {reason}"
