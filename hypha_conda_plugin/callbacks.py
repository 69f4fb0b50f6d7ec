"""Calling the callbacks clients hand us (progress, output): sync, async or remote.

A callback is the client's code, often a remote function on a connection that may
already be gone. It must never break or stall the session it reports on, so failures are
logged and a slow callback is abandoned after ``timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0

Progress = Callable[[dict[str, Any]], Awaitable[None]]
"""The worker's own progress sink handed down to builds and staging: it logs the message
and forwards it to the client's callback through ``notify``."""


async def notify(
    callback: Callable[[dict[str, Any]], Any] | None,
    message: dict[str, Any],
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Deliver ``message`` to ``callback`` if there is one; never raises."""
    if callback is None:
        return
    try:
        result = callback(message)
        if inspect.isawaitable(result):
            await asyncio.wait_for(result, timeout)
    except Exception as error:
        logger.warning("Callback failed for a %s message: %s", message.get("type"), error)
