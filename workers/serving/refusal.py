"""The typed error for a model that a worker refuses to serve, while it serves its others."""

from __future__ import annotations


class ModelRefused(Exception):
    """This model's files cannot be served as its registry entry says (a corrupted or mismatched
    ONNX export, a missing runtime): the worker logs the reason, leaves the model out of its
    catalog and queues, and serves its other models.

    Any other load failure still stops the worker (it would rather not start half-ready).
    """
