"""The rules for numbers callers send: time limits, log offsets and page sizes.

Every number that crosses the RPC boundary is checked here before it reaches the event
loop. ``float("nan") <= 0`` is false, so a plain sign check lets NaN through, and a NaN
or infinite delay in asyncio's timer heap makes other timers fire out of order; an
unbounded one keeps a kernel busy forever. Each rule refuses with
:class:`InvalidArgumentError`, naming the field and the accepted range.
"""

from __future__ import annotations

import math

from hypha_conda_plugin.errors import InvalidArgumentError

#: The longest time limit a caller may ask for (one day).
MAX_TIME_LIMIT = 24 * 3600.0
#: The largest log page (``get_logs`` ``limit``) a caller may ask for.
MAX_LOG_PAGE = 10_000
#: Offsets beyond this are certainly mistakes (a log holds far fewer entries).
MAX_LOG_OFFSET = 2**31 - 1
#: How much of a refused value an error message quotes.
_QUOTE = 60


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE else text[: _QUOTE - 3] + "..."


def time_limit(value: object, field: str, *, maximum: float = MAX_TIME_LIMIT) -> float:
    """A finite, positive number of seconds no larger than ``maximum``.

    Booleans are refused (``True`` is an ``int`` in Python but never meant as seconds),
    and so are strings: ``"30"`` is most likely a client bug we should not paper over.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(
            f"{field} must be a number of seconds, got {_quote(value)} "
            f"({type(value).__name__}); pass e.g. 30."
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0 or seconds > maximum:
        raise InvalidArgumentError(
            f"{field} must be a positive number of seconds no larger than {maximum:g}, "
            f"got {_quote(value)}."
        )
    return seconds


def optional_time_limit(
    value: object, field: str, default: float | None, *, maximum: float = MAX_TIME_LIMIT
) -> float | None:
    """``None`` (or a missing value) means ``default``; anything else must be valid."""
    if value is None:
        return default
    return time_limit(value, field, maximum=maximum)


def count(value: object, field: str, *, maximum: int) -> int:
    """A whole number from 0 to ``maximum`` (an offset or a page size)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(
            f"{field} must be a whole number from 0 to {maximum}, got {_quote(value)} "
            f"({type(value).__name__})."
        )
    if value < 0 or value > maximum:
        raise InvalidArgumentError(
            f"{field} must be a whole number from 0 to {maximum}, got {_quote(value)}."
        )
    return value


def log_window(offset: object, limit: object) -> tuple[int, int | None]:
    """``get_logs`` paging: ``offset`` from 0, ``limit`` None (everything) or up to a page."""
    checked_offset = count(0 if offset is None else offset, "offset", maximum=MAX_LOG_OFFSET)
    if limit is None:
        return checked_offset, None
    return checked_offset, count(limit, "limit", maximum=MAX_LOG_PAGE)


def callback(value: object, field: str) -> object:
    """A client's callback: absent (None) or something we can call."""
    if value is not None and not callable(value):
        raise InvalidArgumentError(
            f"{field} must be a function (or left out), got {_quote(value)} "
            f"({type(value).__name__})."
        )
    return value


def options(value: object, field: str) -> dict:
    """An options mapping such as ``execute``'s ``config``: absent (None) or a dict."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(
            f"{field} must be a mapping such as {{'timeout': 30}}, got {_quote(value)} "
            f"({type(value).__name__})."
        )
    return value
