"""How long a 429 asks us to wait, from the retry hints real servers send.

Servers and proxies say it in different headers; the first one present wins, in this order:

* ``retry-after-ms``: milliseconds (OpenAI's API, and proxies copying it);
* ``Retry-After``: seconds, or an HTTP date (RFC 9110);
* ``llm_provider-retry-after``: seconds (LiteLLM's proxy forwards its provider's hint so);
* ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens``: durations such as ``1s``,
  ``6m0s`` or ``20ms`` (OpenAI's format, also LiteLLM's): the limit whose
  ``x-ratelimit-remaining-*`` is 0, else the later of the two.

Anything unparsable, negative or infinite is ignored: a junk hint must neither park a
request forever nor hammer a busy backend (the gate's own backoff applies instead).
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping

__all__ = ["parse_duration", "parse_retry_after", "retry_after_s"]

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _finite(seconds: float) -> float | None:
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds or an HTTP date; else None."""
    if not value:
        return None
    try:
        return _finite(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_duration(value: str | None) -> float | None:
    """Seconds from an OpenAI-style duration (``1s``, ``6m0s``, ``20ms``, ``1h2m``) or a
    plain number of seconds; None if it is neither."""
    if not value:
        return None
    value = value.strip()
    try:
        return _finite(float(value))
    except ValueError:
        pass
    parts = list(_DURATION.finditer(value))
    if not parts or "".join(part.group(0) for part in parts) != value:
        return None
    return _finite(sum(float(p["value"]) * _UNIT_S[p["unit"]] for p in parts))


def _rate_limit_reset(headers: Mapping[str, str]) -> float | None:
    resets = {}
    for kind in ("requests", "tokens"):
        reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
        if reset is not None:
            resets[kind] = reset
    exhausted = [resets[kind] for kind in resets
                 if headers.get(f"x-ratelimit-remaining-{kind}", "").strip() == "0"]
    candidates = exhausted or list(resets.values())
    return max(candidates) if candidates else None


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """How long the server asks us to wait, in seconds, from whichever hint it sent."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            found = _finite(float(millis) / 1000)
        except ValueError:
            found = None
        if found is not None:
            return found
    for name in ("retry-after", "llm_provider-retry-after"):
        found = parse_retry_after(headers.get(name))
        if found is not None:
            return found
    return _rate_limit_reset(headers)
