"""The short chaos run for CI (about a minute and a half on two cores): 300 mixed jobs, 3 worker
SIGKILLs, 1 Redis restart; nothing lost, nothing wrong, nothing duplicated.

The long run (>= 5,000 jobs, >= 10 kills) is ``python -m bench.chaos``; its figures are in
docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fleet_processes import REPO_ROOT

pytestmark = pytest.mark.integration


def test_short_chaos_run_loses_nothing(demo_registry, tmp_path):
    report_path = tmp_path / "chaos.json"
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--jobs", "300", "--kills", "3",
                           "--redis-restarts", "1", "--workers", "2", "--seed", "7", "--rate", "50",
                           "--registry", str(demo_registry), "--json", str(report_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    tail = (done.stdout + done.stderr)[-6000:]
    assert report_path.exists(), tail
    report = json.loads(report_path.read_text())
    print(json.dumps({k: v for k, v in report.items() if k != "events"}, indent=1))
    assert report["submitted"] == 300, tail
    assert report["lost"] == 0, tail
    assert report["wrong"] == 0, tail
    assert report["failed_unexpectedly"] == 0 and report["dead_lettered"] == 0, tail
    assert report["duplicated"] == 0, tail
    assert report["completed"] + report["failed_as_expected"] == 300, tail
    assert report["failed_as_expected"] > 0  # the invalid payloads were exercised
    assert sum("SIGKILLed" in event for event in report["events"]) == 3
    assert sum("Redis restarted" in event for event in report["events"]) == 1
    assert done.returncode == 0, tail
