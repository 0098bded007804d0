"""The versions of celery, kombu and redis-py whose internals Fleet's patches were written for.

Fleet replaces a few private methods of these libraries (``workers/queue/redis_patches.py``,
``workers/queue/consumer_guard.py``, ``producer/redis_connection.py``'s
``MasterFollowingConnection``). Each patch calls ``require_tested_version`` before it installs
itself, so that on a release nobody checked it against it refuses with ``UntestedVersionError``
instead of silently changing code it no longer matches. ``pyproject.toml`` carries the same
ranges as install bounds (a unit test keeps the two equal).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from producer.errors import FleetError

#: Distribution -> (lowest tested release, first untested release): ``low <= version < high``.
TESTED_VERSIONS: dict[str, tuple[str, str]] = {
    "celery": ("5.7", "5.8"),
    "kombu": ("5.7", "5.8"),
    "redis": ("8.0", "8.3"),
}


class UntestedVersionError(FleetError, RuntimeError):
    """A patched library is installed in a version outside the range its patch was written for."""


def release(text: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"5.7.0rc1"`` -> ``(5, 7, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def require_tested_version(distribution: str, patch: str, installed: str | None = None) -> None:
    """Raise ``UntestedVersionError`` unless ``distribution`` is inside its ``TESTED_VERSIONS`` range.

    ``patch`` names what is about to be installed (for the message); ``installed`` defaults to the
    version in the installed package metadata.
    """
    low, high = TESTED_VERSIONS[distribution]
    if installed is None:
        try:
            installed = version(distribution)
        except PackageNotFoundError as exc:
            raise UntestedVersionError(f"{patch} patches {distribution}, which is not installed") from exc
    if not release(low) <= release(installed) < release(high):
        raise UntestedVersionError(
            f"{patch} patches internals of {distribution} and was written for {distribution} >={low},<{high}; "
            f"{distribution} {installed} is installed. Install a tested release (pip install "
            f"'{distribution}>={low},<{high}') or check the patch against {installed} and widen "
            f"producer/version_guard.py TESTED_VERSIONS and pyproject.toml together.")
