"""Patches of celery, kombu and redis-py internals refuse to install on a release they were not written for."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from producer.version_guard import TESTED_VERSIONS, UntestedVersionError, require_tested_version

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("installed", ["5.6.9", "5.8.0", "5.8.0rc1", "6.0"])
def test_a_release_outside_the_tested_range_is_refused_with_the_range_and_the_fix(installed):
    with pytest.raises(UntestedVersionError) as refused:
        require_tested_version("kombu", "workers.queue.redis_patches", installed=installed)
    message = str(refused.value)
    assert f"kombu {installed} is installed" in message
    assert "kombu >=5.7,<5.8" in message and "workers.queue.redis_patches" in message


@pytest.mark.parametrize("installed", ["5.7", "5.7.0", "5.7.3"])
def test_a_tested_release_is_accepted(installed):
    require_tested_version("kombu", "workers.queue.redis_patches", installed=installed)


def test_pyproject_bounds_are_the_tested_ranges():
    """pip refuses what the patches would refuse: the install bounds and the guard agree."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specifiers = {Requirement(line).name: Requirement(line).specifier for line in dependencies}
    for distribution, (low, high) in TESTED_VERSIONS.items():
        assert {str(spec) for spec in specifiers[distribution]} == {f">={low}", f"<{high}"}, distribution


def _with_installed_metadata(tmp_path: Path, distribution: str, version: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that finds ``distribution`` ``version`` first in its package metadata."""
    info = tmp_path / f"{distribution}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("distribution, version", [("kombu", "5.8.0"), ("celery", "6.0.0"), ("redis", "9.0.0")])
def test_the_worker_app_refuses_to_start_on_an_untested_release(tmp_path, distribution, version):
    done = _with_installed_metadata(tmp_path, distribution, version, "import workers.queue.app")
    assert done.returncode != 0
    assert "UntestedVersionError" in done.stderr and f"{distribution} {version} is installed" in done.stderr


def test_a_sentinel_client_refuses_master_following_on_an_untested_redis_py(tmp_path):
    code = ("from producer.redis_connection import redis_client\n"
            "from producer.settings import FleetSettings\n"
            "redis_client(FleetSettings(redis_url='sentinel://127.0.0.1:1', sentinel_master='m'))\n")
    done = _with_installed_metadata(tmp_path, "redis", "9.0.0", code)
    assert done.returncode != 0
    assert "MasterFollowingConnection" in done.stderr and "redis 9.0.0 is installed" in done.stderr
