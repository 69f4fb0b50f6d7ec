"""The background step that completes a new environment: the rest of its bytecode, then
read-only (see envs/bytecode.py for why and how).

It holds a lease on the environment meanwhile, so that nothing removes it under a
compile, but not a use: like a warm kernel's, the lease is one the cache may ask back
(``let_go``) when the environment's turn to be evicted comes, so that a compile running
in the background never makes a more recently used environment go in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hypha_conda_plugin.envs.bytecode import compile_remaining, seal

if TYPE_CHECKING:
    from pathlib import Path

    from hypha_conda_plugin.envs.cache import EnvCache
    from hypha_conda_plugin.envs.spec import EnvSpec

logger = logging.getLogger(__name__)

#: How long the cache waits for a completion it asked back to let go of its lease.
LET_GO_WAIT = 30.0


@dataclass
class _Running:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class EnvironmentCompletion:
    """Completes environments in the background, one task per environment."""

    def __init__(self, cache: EnvCache) -> None:
        self._cache = cache
        self._running: dict[str, _Running] = {}

    async def run(self, spec: EnvSpec) -> None:
        """Compile the rest of ``spec``'s environment, then seal it (a background task)."""
        lease = await self._cache.acquire(spec, _quiet, touch=False)
        running = self._running[lease.key] = _Running()
        try:
            if await complete(lease.prefix, running.stop, spec.requested_packages):
                logger.info("Environment %s compiled and sealed read-only", lease.key)
            else:
                logger.info("Environment %s sealed read-only (not all compiled)", lease.key)
        finally:
            if self._running.get(lease.key) is running:
                del self._running[lease.key]
            running.done.set()
            await lease.release()

    async def let_go(self, key: str) -> None:
        """The cache must remove environment ``key``: stop compiling it, seal what is
        there, give the lease back (returns when it has, or after ``LET_GO_WAIT``)."""
        running = self._running.get(key)
        if running is None:
            return
        running.stop.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(running.done.wait(), LET_GO_WAIT)


async def complete(prefix: Path, stop: asyncio.Event, first: Collection[str] = ()) -> bool:
    """Compile what has no bytecode (the packages named in ``first`` first) unless
    ``stop`` is set first, then seal the environment whatever happened (even on
    cancellation: a kernel must never be able to write into it). Returns whether every
    file was compiled."""
    compiling = asyncio.ensure_future(compile_remaining(prefix, first))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({compiling, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not compiling.done():
            compiling.cancel()
            await asyncio.gather(compiling, return_exceptions=True)
        await asyncio.shield(asyncio.to_thread(seal, prefix))
    return not compiling.cancelled() and compiling.exception() is None and compiling.result()


async def _quiet(_: dict[str, Any]) -> None:
    return None
