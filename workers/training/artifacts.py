"""Where training jobs keep checkpoints and final models.

``ArtifactStore`` is the interface the training loop writes through; ``LocalDirectoryStore``
implements it on a directory (in production a shared volume or PVC mounted by every
training worker, so that a job resumes on whichever worker receives it again).

Every write is atomic: data goes to a temporary name in the destination directory, is
fsynced, then renamed into place. A process killed mid-write leaves at most a stray
temporary file, never a truncated checkpoint or a half-written model under its real name.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Job ids become directory names: letters, digits, ``_ . -``, starting with a letter or digit.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
_CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")


class ArtifactStore(ABC):
    """Checkpoints and final models of training jobs, keyed by job id.

    A checkpoint is a dict of tensors, numbers, strings, lists and dicts (it is loaded
    with ``torch.load(weights_only=True)``, which never runs pickled code). Locations
    returned are strings: a filesystem path for local stores, a URI for remote ones.
    """

    @abstractmethod
    def save_checkpoint(self, job_id: str, step: int, state: dict[str, Any]) -> str:
        """Store ``state`` as the checkpoint of ``job_id`` after optimizer step ``step``
        (replacing one of the same step) and return its location."""

    @abstractmethod
    def latest_checkpoint(self, job_id: str) -> int | None:
        """The step of the newest complete checkpoint of ``job_id``, or None if it has none."""

    @abstractmethod
    def load_checkpoint(self, job_id: str, step: int) -> dict[str, Any]:
        """The checkpoint of ``job_id`` at ``step``, tensors on the CPU."""

    @abstractmethod
    def save_model(self, job_id: str, write: Callable[[Path], None]) -> str:
        """Publish the final model of ``job_id``: call ``write(directory)`` on an empty local
        directory, then make its content the job's model (replacing an earlier one) in one
        step. Return the model's location."""

    @abstractmethod
    def model_directory(self, job_id: str) -> Path:
        """A local directory holding the final model of ``job_id`` (loadable with
        ``from_pretrained`` or ``load_classifier``). Raises ``FileNotFoundError`` if none."""


class LocalDirectoryStore(ArtifactStore):
    """An ``ArtifactStore`` on the directory ``root``:
    ``root/checkpoints/<job_id>/step-<8-digit step>.pt`` and ``root/models/<job_id>/``.

    Only the ``keep_last`` newest checkpoints of a job are kept.
    """

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def save_checkpoint(self, job_id: str, step: int, state: dict[str, Any]) -> str:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        directory = self._checkpoint_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"step-{step:08d}.pt"
        temporary = directory / f".{final.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as handle:
                import torch  # the store is also used where torch is absent (a consumer finding a model)

                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_directory(directory)
        for old_step in self._checkpoint_steps(job_id)[: -self.keep_last]:
            (directory / f"step-{old_step:08d}.pt").unlink(missing_ok=True)
        return str(final)

    def latest_checkpoint(self, job_id: str) -> int | None:
        steps = self._checkpoint_steps(job_id)
        return steps[-1] if steps else None

    def load_checkpoint(self, job_id: str, step: int) -> dict[str, Any]:
        path = self._checkpoint_dir(job_id) / f"step-{step:08d}.pt"
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)

    def save_model(self, job_id: str, write: Callable[[Path], None]) -> str:
        final = self._model_dir(job_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{job_id}.{uuid.uuid4().hex}.tmp"
        displaced = final.parent / f".{job_id}.{uuid.uuid4().hex}.old"
        staging.mkdir()
        try:
            write(staging)
            for path in staging.rglob("*"):
                if path.is_file():
                    _fsync_file(path)
            _fsync_directory(staging)
            if final.exists():
                # A directory cannot be renamed over a non-empty one: move the old model
                # aside first. Readers see the old model, briefly none, then the new one.
                os.rename(final, displaced)
            os.rename(staging, final)
            _fsync_directory(final.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(displaced, ignore_errors=True)
        return str(final)

    def model_directory(self, job_id: str) -> Path:
        directory = self._model_dir(job_id)
        if not directory.is_dir():
            raise FileNotFoundError(f"no final model for job {job_id!r} under {self.root}")
        return directory

    def _checkpoint_steps(self, job_id: str) -> list[int]:
        directory = self._checkpoint_dir(job_id)
        if not directory.is_dir():
            return []
        matches = (_CHECKPOINT_RE.match(entry.name) for entry in directory.iterdir())
        return sorted(int(match.group(1)) for match in matches if match)

    def _checkpoint_dir(self, job_id: str) -> Path:
        return self.root / "checkpoints" / _checked_job_id(job_id)

    def _model_dir(self, job_id: str) -> Path:
        return self.root / "models" / _checked_job_id(job_id)


def _checked_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r} does not match {JOB_ID_PATTERN}")
    return job_id


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
