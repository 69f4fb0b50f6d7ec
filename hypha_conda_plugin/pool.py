"""Warm kernels: started ahead for environments in use, handed out once, never reused.

A kernel takes 0.2-1 s to start (a new Python importing ipykernel); a session on a
cached environment should be ready in milliseconds. So for every environment a session
recently started on, a few kernels wait, already running, in instance folders of their
own. ``start`` takes one (:meth:`KernelPool.take`), and the pool starts a replacement in
the background.

Rules that keep this safe and cheap:

- A warm kernel has never run anyone's code. It is started by the same launcher as a
  fresh kernel (same sandbox, same variables); the session's own variables are applied
  by the same bootstrap cell either way. Each is handed to exactly one session, which
  then owns its instance folder; it never comes back to the pool.
- Each warm kernel holds a lease on its environment, so the cache cannot delete it
  underneath; an environment nobody started a session on for ``idle_seconds`` loses its
  warm kernels and with them the leases.
- Warm kernels count against the worker's kernel budget: when a session needs room,
  :meth:`evict_one` shuts down a warm kernel first.
- Refills run one at a time, at the pace of kernel start-up, so a burst of starts does
  not turn into a burst of background kernels competing with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hypha_conda_plugin.instances import Instance, WorkingRoot
from hypha_conda_plugin.kernel import Kernel
from hypha_conda_plugin.launcher import KernelLauncher

logger = logging.getLogger(__name__)


class Lease(Protocol):
    """What the pool needs of an environment lease (envs/cache.py)."""

    key: str

    @property
    def prefix(self) -> Any: ...

    async def release(self) -> None: ...


@dataclass
class WarmKernel:
    """A started kernel in its instance folder, with the lease on its environment."""

    instance: Instance
    kernel: Kernel
    lease: Lease
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class _EnvPool:
    lease_factory: Callable[[], Awaitable[Lease]]
    ready: list[WarmKernel] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    starting: int = 0


class KernelPool:
    """Warm kernels per environment key (see the module docstring)."""

    def __init__(
        self,
        launcher: KernelLauncher,
        root: WorkingRoot,
        *,
        size: int,
        idle_seconds: float,
        has_room: Callable[[], bool],
    ) -> None:
        self.launcher = launcher
        self.root = root
        self.size = size
        self.idle_seconds = idle_seconds
        self.has_room = has_room
        self._pools: dict[str, _EnvPool] = {}
        self._refilling: asyncio.Task[None] | None = None
        self._discarding: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def warm_count(self) -> int:
        return sum(len(p.ready) + p.starting for p in self._pools.values())

    def ready_counts(self) -> dict[str, int]:
        """Warm kernels ready to be handed out, per environment key."""
        return {key: len(pool.ready) for key, pool in self._pools.items() if pool.ready}

    def take(self, key: str) -> WarmKernel | None:
        """A warm kernel of environment ``key`` for one session, or None.

        Synchronous between the check and the pop, so two starts can never get the same
        kernel. A kernel that died while waiting is discarded.
        """
        pool = self._pools.get(key)
        if pool is None:
            return None
        pool.last_used = time.monotonic()
        while pool.ready:
            warm = pool.ready.pop(0)
            if warm.kernel.is_alive:
                return warm
            self._discard(warm)
        return None

    def want(self, key: str, lease_factory: Callable[[], Awaitable[Lease]]) -> None:
        """A session started on ``key``: keep ``size`` kernels of it warm from now on.

        ``lease_factory`` takes a new lease on the environment for each warm kernel.
        """
        if not self.enabled or self._closed:
            return
        pool = self._pools.setdefault(key, _EnvPool(lease_factory))
        pool.lease_factory = lease_factory
        pool.last_used = time.monotonic()
        self._kick()

    def _kick(self) -> None:
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.ensure_future(self._refill())

    async def _refill(self) -> None:
        """Start missing warm kernels one at a time, most recently used environment first."""
        while not self._closed:
            self.shrink()
            wanting = [
                (key, pool)
                for key, pool in self._pools.items()
                if len(pool.ready) + pool.starting < self.size
            ]
            if not wanting or not self.has_room():
                return
            key, pool = max(wanting, key=lambda item: item[1].last_used)
            pool.starting += 1
            try:
                warm = await self._start_one(pool)
            finally:
                pool.starting -= 1
            if warm is None:
                return  # a failure: try again at the next start rather than spin
            if self._closed or self._pools.get(key) is not pool or not self.has_room():
                # Closed, shrunk, or sessions took the room while it started.
                await self._shutdown(warm)
                return
            pool.ready.append(warm)

    async def _start_one(self, pool: _EnvPool) -> WarmKernel | None:
        lease = None
        instance = self.root.new_instance()
        kernel = None
        try:
            lease = await pool.lease_factory()
            kernel = await self.launcher.start(instance, lease.prefix)
            return WarmKernel(instance, kernel, lease)
        except asyncio.CancelledError:
            await self._cleanup(instance, kernel, lease)
            raise
        except Exception as error:
            logger.warning("Could not start a warm kernel: %s", error)
            await self._cleanup(instance, kernel, lease)
            return None

    def shrink(self) -> None:
        """Let go of environments nobody started a session on for ``idle_seconds``."""
        now = time.monotonic()
        for key, pool in list(self._pools.items()):
            if now - pool.last_used > self.idle_seconds and not pool.starting:
                del self._pools[key]
                for warm in pool.ready:
                    self._discard(warm)
                logger.info("Warm kernels of environment %s stopped: idle", key)

    async def reclaim(self, key: str) -> None:
        """The cache must remove or rebuild environment ``key``: let its kernels go, and
        with them their leases (they are started again at the next session's start)."""
        pool = self._pools.pop(key, None)
        if pool is not None:
            await asyncio.gather(*(self._shutdown(w) for w in pool.ready), return_exceptions=True)

    def evict_one(self) -> bool:
        """Shut down one warm kernel (least recently used environment) to make room."""
        candidates = [(p.last_used, key) for key, p in self._pools.items() if p.ready]
        if not candidates:
            return False
        _, key = min(candidates)
        self._discard(self._pools[key].ready.pop())
        return True

    def _discard(self, warm: WarmKernel) -> None:
        """Shut a warm kernel down in the background (callers are synchronous)."""
        task = asyncio.ensure_future(self._shutdown(warm))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def _shutdown(self, warm: WarmKernel) -> None:
        await self._cleanup(warm.instance, warm.kernel, warm.lease)

    @staticmethod
    async def _cleanup(instance: Instance, kernel: Kernel | None, lease: Lease | None) -> None:
        if kernel is not None:
            with contextlib.suppress(Exception):
                await kernel.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(instance.remove)
        if lease is not None:
            with contextlib.suppress(Exception):
                await lease.release()

    async def close(self) -> None:
        """Stop every warm kernel and any refill in progress (worker shutdown)."""
        self._closed = True
        if self._refilling is not None:
            self._refilling.cancel()
            with contextlib.suppress(BaseException):
                await self._refilling
        pools, self._pools = self._pools, {}
        await asyncio.gather(
            *(self._shutdown(w) for p in pools.values() for w in p.ready),
            *self._discarding,
            return_exceptions=True,
        )
