"""The producer side must never import torch or transformers."""

import subprocess
import sys


def test_importing_producer_loads_no_torch():
    code = ("import sys, producer; from producer import FleetClient; "
            "heavy = [m for m in ('torch', 'transformers', 'workers') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_fleet_health_command_loads_no_torch():
    code = ("import sys; from workers.commands import cli; from workers.process import health; "
            "from workers.queue import app, tasks; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
