"""A model output that is not finite fails its job: results are strict JSON (docs/PROTOCOL.md).

A float32 model can overflow on inputs inside the documented range (a digits MLP given
``[3e38] * 64`` computes ``inf - inf``), and NaN or infinity has no JSON form. Inference
checks each output tensor here before building a result; this module never imports torch
(it calls ``isfinite`` on the tensors it is given).
"""

from __future__ import annotations

from typing import Sequence

from producer.contract import ErrorCode
from producer.errors import JobFailedError

#: How many offending input positions an error lists.
MAX_LISTED_INPUTS = 32


def require_finite(outputs: Sequence, what: str, model: str) -> None:
    """Raise ``JobFailedError(model_error)`` if any tensor of ``outputs`` (one per input, input order) holds
    a NaN or an infinity. ``what`` names the output in the message (``"embedding"``, ``"score"``)."""
    bad = [index for index, output in enumerate(outputs) if not bool(output.isfinite().all())]
    if bad:
        raise JobFailedError(ErrorCode.MODEL_ERROR.value,
                             f"model {model!r} computed a {what} that is not a finite number (NaN or infinity) for "
                             f"{len(bad)} of {len(outputs)} input(s), first at input {bad[0]}; no JSON result "
                             "can hold it",
                             {"non_finite": what, "inputs": bad[:MAX_LISTED_INPUTS]})
