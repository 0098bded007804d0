"""A plain Celery client that knows only docs/PROTOCOL.md gets correct results, reads errors and cancels jobs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"


def documented_client_program() -> str:
    text = PROTOCOL.read_text()
    section = text[text.index("## A plain Celery client"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_documented_plain_celery_client_works(embed_worker, redis_url):
    program = documented_client_program()
    assert "producer" not in program and "workers" not in program
    with tempfile.TemporaryDirectory() as empty_dir:
        # Run from an empty directory with -I semantics for the project: Fleet's packages are not importable.
        script = Path(empty_dir) / "client.py"
        script.write_text(program + "\nimport sys\nassert 'producer' not in sys.modules\n")
        env = {**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": ""}
        completed = subprocess.run([sys.executable, "-P", str(script)], cwd=empty_dir, env=env,
                                   capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["minilm", "384", "2", "invalid_input", "cancelled"]
