"""Go's `time.Duration` text format, as OpenAI sends it in `x-ratelimit-reset-*` headers."""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# Longer units first so that "ms" is not read as "m" followed by garbage.
_COMPONENT = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration such as ``6m0s``, ``2m59.56s``, ``20ms`` or ``-1.5h``.

    Follows Go's `time.ParseDuration`: a sign, then one or more number+unit pairs; a bare ``0``
    is the only number allowed without a unit. Raises ValueError on anything else (or infinite).
    """
    if not isinstance(text, str):
        raise ValueError(f"not a duration: {text!r}")
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("-", "+") else text
    if body == "0":
        return 0.0
    seconds, position = 0.0, 0
    while position < len(body):
        component = _COMPONENT.match(body, position)
        if component is None:
            raise ValueError(f"not a duration: {text!r}")
        number, unit = component.groups()
        seconds += float(number) * _UNIT_SECONDS[unit]
        position = component.end()
    if position == 0 or not math.isfinite(seconds):
        raise ValueError(f"not a duration: {text!r}")
    return sign * seconds
