"""pytest plugin of scripts/gpu_check.sh (`-p tests.gpu_report`): appends each test's outcome to the JSON-lines
results file `$GPU_RESULTS` as soon as the test ends, so a phase stopped at its time limit keeps what finished.

One line per test: {"kind": "test", "phase", "test", "outcome": passed|failed|skipped|error, "seconds",
"reason"} (reason: the skip reason, or the failure's last line)."""

import json
import os
import time

import pytest


def _append(record: dict) -> None:
    path = os.environ.get("GPU_RESULTS")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record the test once: its call phase, or the setup/teardown phase that failed or skipped it (under
    pytest-xdist, by the controller only)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when in ("setup", "teardown") and not report.passed):
        outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
        reason = None
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2]
        elif report.failed:
            reason = str(report.longrepr).strip().splitlines()[-1][:500]
        _append({"kind": "test", "phase": os.environ.get("GPU_PHASE", "tests"), "test": report.nodeid,
                 "outcome": outcome, "seconds": round(report.duration, 2), "reason": reason,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
