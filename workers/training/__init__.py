"""The training library: data, models, the loop and artifact storage for ``fleet.train``.

A pure library (no Celery): the task validates a ``TrainRequest``, picks the device and a
store, and calls ``run_training``.
"""

from workers.training.artifacts import ArtifactStore, LocalDirectoryStore
from workers.training.errors import TrainingConfigError
from workers.training.loop import run_training
from workers.training.models import load_classifier
from workers.training.precision import check_precision

__all__ = [
    "ArtifactStore", "LocalDirectoryStore", "TrainingConfigError", "check_precision", "load_classifier",
    "run_training",
]
