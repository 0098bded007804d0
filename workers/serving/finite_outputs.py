"""A model output that is not finite fails its job: results are strict JSON (docs/PROTOCOL.md).

A float32 model can overflow on inputs inside the documented range (a digits MLP given
``[3e38] * 64`` computes ``inf - inf``), and NaN or infinity has no JSON form. A consumer checks
the rows the device process returned (one per input) here before it builds a result.
"""

from __future__ import annotations

import numpy as np

from producer.contract import ErrorCode
from producer.errors import JobFailedError

#: How many offending input positions an error lists.
MAX_LISTED_INPUTS = 32


def require_finite(rows: np.ndarray, what: str, model: str) -> None:
    """Raise ``JobFailedError(model_error)`` if any row of ``rows`` (one per input, input order) holds a NaN
    or an infinity. ``what`` names the output in the message (``"embedding"``, ``"score"``)."""
    finite = np.isfinite(rows).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite).tolist()
    raise JobFailedError(ErrorCode.MODEL_ERROR.value,
                         f"model {model!r} computed a {what} that is not a finite number (NaN or infinity) for "
                         f"{len(bad)} of {len(rows)} input(s), first at input {bad[0]}; no JSON result can hold it",
                         {"non_finite": what, "inputs": bad[:MAX_LISTED_INPUTS]})
