"""`fleet demo`, the README's main command, run as a user runs it, against a private Redis."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support.fleet_processes import fleet_executable
from workers.process.embedded_redis import RedisServer

pytestmark = pytest.mark.integration


def test_fleet_demo_prints_real_embed_classify_and_training_results(tmp_path):
    server = RedisServer().start()
    try:
        done = subprocess.run([*fleet_executable(), "demo"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "REDIS_URL": server.url, "COLUMNS": "200"})
    finally:
        server.stop()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "8 jobs done" in output and "384-dimensional unit vectors" in output
    # Nearest neighbours are the paraphrases; new sentences get their topics.
    assert re.search(r"A man is playing a guitar on stage\.\s*│\s*Someone performs music with a guitar\.", output)
    assert re.search(r"The central bank cut interest rates again\.\s*│\s*finance 0\.\d\d", output)
    assert re.search(r"Heavy snow is forecast for tomorrow morning\.\s*│\s*weather 0\.\d\d", output)
    accuracy = float(re.search(r"held-out accuracy (0\.\d+)", output).group(1))
    assert accuracy >= 0.97
    assert (tmp_path / "var" / "demo-models" / "registry.toml").exists()
