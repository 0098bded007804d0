"""The exit codes of every ``fleet`` command: one table, here and in README "Exit codes".

Codes 64-78 follow BSD ``sysexits.h``, as Celery's own CLI does (``celery.platforms``); 2 is
click's code for a usage error; 130 and 141 are what a shell reports for SIGINT and SIGPIPE.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a ``fleet`` process's exit status means."""

    #: Done; for ``fleet health``: a matching worker is ready (or alive, with ``--live``).
    OK = 0
    #: The command ran and the answer is no: not ready, no such dead letter, the training job failed.
    FAILURE = 1
    #: Bad arguments or options (click's usage error); nothing was done.
    USAGE = 2
    #: The fleet refused the request (invalid input, unknown model, queue full); nothing was enqueued.
    REFUSED = 65  # EX_DATAERR
    #: Redis cannot be reached (nothing listens, or it does not answer in time).
    REDIS_UNAVAILABLE = 69  # EX_UNAVAILABLE
    #: A worker could not load its models.
    MODEL_LOAD_FAILED = 70  # EX_SOFTWARE
    #: A worker's device process died; the worker stopped so that its supervisor (``fleet up``,
    #: Kubernetes) starts it again.
    DEVICE_LOST = 75  # EX_TEMPFAIL
    #: Bad configuration: ``REDIS_URL`` or a ``FLEET_*`` setting, Redis credentials, the model registry,
    #: the device, or a missing optional extra.
    CONFIG = 78  # EX_CONFIG
    #: Interrupted by Ctrl-C (128 + SIGINT).
    INTERRUPTED = 130
    #: The reader of its output went away (``fleet dlq list | head``); ended quietly (128 + SIGPIPE).
    OUTPUT_CLOSED = 141
