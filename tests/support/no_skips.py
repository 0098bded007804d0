"""A pytest plugin: with ``FLEET_NO_SKIPS=1`` (set by ``infra/scripts/dev.sh test``), a skipped test
fails the run unless it is marked ``gpu``.

A test that skips because a tool is missing would otherwise pass the suite with a check
silently left out; on the README's test command only the GPU tests may skip on a CPU machine.
"""

from __future__ import annotations

import os

import pytest

ENV = "FLEET_NO_SKIPS"
ALLOWED_MARK = "gpu"

_unexpected: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if (os.environ.get(ENV) == "1" and report.skipped and not hasattr(report, "wasxfail")
            and ALLOWED_MARK not in report.keywords):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unexpected:
        terminalreporter.section(f"skipped without the {ALLOWED_MARK!r} mark ({ENV}=1 makes these failures)")
        for line in _unexpected:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if _unexpected and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
