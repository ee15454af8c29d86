"""What every API writes on the wire the same way: logprobs that JSON can carry."""

from __future__ import annotations

import math

# A grammar-masked or impossible token has logprob -inf (NaN from a broken kernel); JSON has no such number.
# vLLM writes -9999.0 instead, and so does kiln: clients compare and sum these values.
WIRE_MIN_LOGPROB = -9999.0


def wire_logprob(value: float | None) -> float | None:
    """``value`` as a finite JSON number (None stays None: "no logprob here")."""
    if value is None:
        return None
    if math.isnan(value):
        return WIRE_MIN_LOGPROB
    return max(value, WIRE_MIN_LOGPROB)
