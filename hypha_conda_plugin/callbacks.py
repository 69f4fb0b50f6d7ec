"""Delivering messages to the callbacks clients hand us (progress, output).

A callback is the client's code, often a remote function on a connection that may be
slow or already gone. Awaiting it where the work happens would let a client hold what
the work holds: an environment's locks while a start reports "reusing", the kernel's
reader (and so the cell's time limit) while a cell prints. So the work only ever *puts*
a message (:meth:`CallbackQueue.put`, synchronous, never waits) and a task of the
queue's own awaits the callback, one message at a time, in order.

The queue is bounded. When the client is too slow and the queue is full, new messages
are dropped and counted; each delivery is abandoned after ``timeout`` seconds and a
failing callback is logged once. The work goes on either way. When the work is done,
:meth:`CallbackQueue.aclose` gives the queue a bounded time to deliver what is left
(so a client normally sees every message before the call returns, and in order) and
then gives up on the rest; :meth:`CallbackQueue.cancel` stops it at once (the session
ended).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

#: How long one delivery may take before it is abandoned.
DEFAULT_TIMEOUT = 10.0
#: Messages waiting for one callback; more are dropped (and counted).
DEFAULT_QUEUE_SIZE = 1000
#: After the work ended, how long the rest of the queue may take to be delivered.
DRAIN_TIMEOUT = 10.0

Callback = Callable[[dict[str, Any]], Any]
"""A client's callback: sync, async or a remote function (returns an awaitable)."""

Progress = Callable[[dict[str, Any]], Awaitable[None]]
"""The worker's own progress sink handed down to builds and staging. It logs the message
and puts it on the client's queue; it never waits for the client, so awaiting it under a
lock is safe."""


@dataclass(frozen=True)
class DeliveryReport:
    """What became of the messages put on one queue."""

    delivered: int
    dropped: int
    failed: int

    @property
    def lost(self) -> int:
        """Messages the client may not have seen."""
        return self.dropped + self.failed


class CallbackQueue:
    """One client callback, fed in order by a delivery task of its own.

    ``what`` names the callback in logs ("progress_callback of start"). A queue without
    a callback accepts and ignores messages, so call sites need no special case.
    """

    def __init__(
        self,
        callback: Callback | None,
        *,
        what: str,
        maxsize: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.what = what
        self._callback = callback
        self._maxsize = maxsize
        self._timeout = timeout
        self._pending: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._in_flight = False
        self.delivered = 0
        self.dropped = 0
        self.failed = 0

    @property
    def active(self) -> bool:
        return self._callback is not None

    def put(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for delivery; never waits. Dropped (and counted) when full."""
        if self._callback is None or self._closed:
            return
        if len(self._pending) >= self._maxsize:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    "The %s is too slow: dropping messages (its queue holds %d)",
                    self.what,
                    self._maxsize,
                )
            return
        self._pending.append(message)
        self._wakeup.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._deliver_all(), name=f"deliver {self.what}"
            )

    async def aclose(self, grace: float = DRAIN_TIMEOUT) -> DeliveryReport:
        """Accept no more messages; wait up to ``grace`` seconds for the rest to be
        delivered, then give up on what is left."""
        self._closed = True
        self._wakeup.set()
        task = self._task
        try:
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=grace)
        finally:
            self.cancel()
        return self.report()

    def cancel(self) -> None:
        """Stop delivering now (the session ended); what is queued is dropped."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            if self._in_flight:  # given up on while it was being delivered
                self._in_flight = False
                self.dropped += 1
        self._give_up_pending()

    def report(self) -> DeliveryReport:
        return DeliveryReport(delivered=self.delivered, dropped=self.dropped, failed=self.failed)

    def _give_up_pending(self) -> None:
        self.dropped += len(self._pending)
        self._pending.clear()

    async def _deliver_all(self) -> None:
        while True:
            while self._pending:
                await self._deliver(self._pending.popleft())
            if self._closed:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _deliver(self, message: dict[str, Any]) -> None:
        assert self._callback is not None
        self._in_flight = True
        try:
            result = self._callback(message)
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, self._timeout)
        except Exception as error:  # includes the timeout
            self._in_flight = False
            self.failed += 1
            if self.failed == 1:
                reason = (
                    f"took longer than {self._timeout:g} s"
                    if isinstance(error, asyncio.TimeoutError)
                    else f"failed: {error}"
                )
                logger.warning("The %s %s (a %s message)", self.what, reason, message.get("type"))
            return
        self._in_flight = False
        self.delivered += 1
