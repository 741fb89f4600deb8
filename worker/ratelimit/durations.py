"""Every duration a server sends: Go's `time.Duration` text (`x-ratelimit-reset-*` headers) and
the wait hints of refused requests (`retry-after-ms`, `retry-after`, "try again in 1m30s").

One parser for one kind of thing: every place gridtune reads a wait goes through here.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Mapping

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


# "Please try again in 1m30s." / "try again in 6.596s" / "try again in 20 seconds": the number and
# unit words after "try again in", normalised to a Go duration.
_TRY_AGAIN = re.compile(
    r"try again in\s+((?:\d+(?:\.\d+)?\s*(?:milliseconds?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h)"
    r"(?![a-z])[\s,]*(?:and\s+)?)+)",
    re.IGNORECASE,
)
_WORD_UNITS = (
    (re.compile(r"milliseconds?", re.I), "ms"), (re.compile(r"seconds?|secs?", re.I), "s"),
    (re.compile(r"minutes?|mins?", re.I), "m"), (re.compile(r"hours?|hrs?", re.I), "h"),
)


def _finite_wait(seconds: float) -> float | None:
    return max(0.0, seconds) if math.isfinite(seconds) else None


def wait_hint_seconds(headers: Mapping[str, str] | None, message: str = "") -> float | None:
    """The one reader of every "wait this long" a server sends, in seconds (None: no usable hint).

    In order: the `retry-after-ms` header (milliseconds), `retry-after` (seconds, or an HTTP date
    relative to now), then the message's "try again in ..." with ms/s/m/h parts or compounds
    ("1m30s", "2h", "6.596s", "20 seconds"). Negative waits and dates in the past are 0; text that
    is none of these is no hint. Never raises.
    """
    headers = headers or {}
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            if (wait := _finite_wait(float(ms) / 1000)) is not None:
                return wait
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is not None:
        try:
            if (wait := _finite_wait(float(value))) is not None:
                return wait
        except ValueError:
            try:
                when = parsedate_to_datetime(value)
                if when.tzinfo is None:
                    when = when.replace(tzinfo=timezone.utc)
                return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError, IndexError, OverflowError):
                pass
    if message and (match := _TRY_AGAIN.search(message)):
        text = match.group(1)
        for pattern, unit in _WORD_UNITS:
            text = pattern.sub(unit, text)
        try:
            return _finite_wait(parse_go_duration(re.sub(r"[\s,]|and", "", text)))
        except ValueError:
            return None
    return None
