"""What every API reads and writes on the wire the same way: request bodies parsed as JSON (RFC 8259, nothing
Python's parser adds), logprobs that JSON can carry."""

from __future__ import annotations

import json
import math
from typing import Any

from runtime.errors import APIError


class _NotJSONError(ValueError):
    """What Python's parser takes and JSON has not (its NaN and Infinity literals)."""


def _no_constant(name: str) -> Any:
    raise _NotJSONError(f"{name} is not a JSON number (RFC 8259 has no NaN or Infinity)")


def loads_body(raw: bytes) -> Any:
    """A request body as JSON, or a 400 saying why not. Python's parser accepts NaN and Infinity, recurses once per
    nesting level and converts at most 4300 digits: each of those would be a 500 or a non-JSON value inside."""
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark, as some Windows clients send, is dropped
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not UTF-8 (byte {exc.start}): send JSON as UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the request body is not accepted: JSON nested too deeply") from None
    except _NotJSONError as exc:
        raise APIError(400, f"the request body is not accepted: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise APIError(400, "the request body is not accepted: a number with more digits than kiln converts") from None


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
