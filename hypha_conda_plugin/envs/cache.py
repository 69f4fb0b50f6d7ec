"""On-disk environments keyed by spec: built once, checked on every reuse, leased while in
use, and evicted when old or least recently used.

``EnvCache.acquire(spec, progress)`` returns an ``EnvLease``. While a lease is held, no
process that shares the cache folder deletes or rebuilds that environment: a lease is a
shared ``flock`` on the environment's lease file (see ``envs/locks.py`` and
``envs/store.py``), released by ``EnvLease.release()`` or by the kernel when the process
dies. Sessions hold their lease until they end; a warm kernel pool holds leases with
``touch=False`` (not a use, for least-recently-used ordering).

A cache hit is one trip to a worker thread: take the lease, check the environment
against its marker (``envs/integrity.py``: conda-meta records and sampled files, about a
millisecond), update its last-use time. That its python starts is checked once per
process for each build of the environment (a child process costs ~20 ms, too much for
every start); the file check on every reuse catches the damage that would stop it later
(deleted files, a removed interpreter).

A miss, or a failed check, takes the key's build lock (in-process ``asyncio.Lock`` plus a
cross-process file lock, so concurrent starts of a new spec build it once however many
workers share the folder), looks again (someone else may just have built it), and
builds. A failed or cancelled build leaves nothing.

A read-only cache folder (a pre-built cache in an image layer) works for reuse: no lock
file can be created there, and none is needed, since no process can delete anything
from it either; existing lease files are still locked (read-only descriptors can hold
``flock``), so a worker that mounts a shared volume read-only still tells the writers
which environments it uses. Building, last-use times and eviction need a writable folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.childenv import clean_env
from hypha_conda_plugin.envs.builders import Builder, install_pip_packages
from hypha_conda_plugin.envs.eviction import CacheLimits, SweepReport, describe, sweep
from hypha_conda_plugin.envs.integrity import (
    check,
    marker_signature,
    read_marker,
    write_marker,
)
from hypha_conda_plugin.envs.locks import (
    EXCLUSIVE,
    SHARED,
    KeyedLocks,
    LockFile,
    off_loop,
    wait_for_lock,
)
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.envs.store import CacheLayout, Removal, force_rmtree
from hypha_conda_plugin.errors import EnvironmentBuildError
from hypha_conda_plugin.redact import redact

logger = logging.getLogger(__name__)

#: How long a rebuild waits for the last users of a damaged environment to let go.
REBUILD_WAIT = 10.0
#: Time limit of the "python starts" check.
PYTHON_CHECK_TIMEOUT = 60.0
#: Bound of the per-process memos (parsed markers, python checks).
MEMO_LIMIT = 512
#: Tries (5 ms apart) for a shared lease while someone holds it exclusively for a moment.
LEASE_RETRIES = 10


@dataclass(eq=False)
class EnvLease:
    """A ready environment held for use: it is not deleted or rebuilt until released."""

    key: str
    prefix: Path
    reused: bool
    build_seconds: float = 0.0
    touch: bool = True
    _lock: LockFile | None = field(default=None, repr=False)
    _cache: EnvCache | None = field(default=None, repr=False)

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    @property
    def released(self) -> bool:
        return self._lock is None

    async def release(self) -> None:
        """Let the environment go (idempotent). A session's release counts as a use:
        the environment was in use until now, whenever the session started."""
        lock = self._detach()
        if lock is not None:
            await asyncio.to_thread(_let_go, lock, self.touch)
            self._after_release()

    def release_now(self) -> None:
        """``release`` for error paths that cannot await (two fast system calls)."""
        lock = self._detach()
        if lock is not None:
            _let_go(lock, self.touch)
            self._after_release()

    def _after_release(self) -> None:
        if self._cache is not None:
            self._cache._released(self.key)

    def _detach(self) -> LockFile | None:
        lock, self._lock = self._lock, None
        if lock is not None and self._cache is not None:
            self._cache._forget(self)
        return lock


#: The name earlier versions used.
CachedEnv = EnvLease


def _share(lock: LockFile, touch: bool) -> None:
    """Exclusive to shared once built. The build lock is still held, so no deleter can
    step in; only a momentary "in use?" probe can, and it lets go at once."""
    while not lock.convert(SHARED):
        time.sleep(0.005)
    if touch:
        lock.touch()


def _forget_lock_files(prefix: Path, lease: LockFile, build: LockFile) -> None:
    """After a failed build nothing is left to lock: leave no lock files either. Both are
    held exclusively, so deleting them is safe (see envs/locks.py). Three system calls,
    done in place because this runs while a cancellation unwinds."""
    if not os.path.lexists(prefix):
        lease.unlink()
        build.unlink()


def _let_go(lock: LockFile, touch: bool) -> None:
    if touch:
        lock.touch()
    lock.release()


class EnvCache:
    def __init__(
        self,
        envs_dir: Path,
        builder: Builder,
        *,
        channel_alias: str | None,
        platform: str,
        pip_timeout: float,
        limits: CacheLimits | None = None,
        finish: Callable[[Path, Progress], Awaitable[None]] | None = None,
        max_concurrent_builds: int | None = None,
    ) -> None:
        """``finish`` completes a built environment before it is marked ready (the
        bytecode a kernel needs, see envs/bytecode.py). ``max_concurrent_builds``: builds
        of different environments running at once in this process (each is a solver
        child that may take gigabytes); others wait their turn."""
        self.layout = CacheLayout(envs_dir)
        self.finish = finish
        self.max_concurrent_builds = max_concurrent_builds
        self._build_slots = (
            asyncio.Semaphore(max_concurrent_builds) if max_concurrent_builds else None
        )
        self.builder = builder
        self.channel_alias = channel_alias
        self.platform = platform
        self.pip_timeout = pip_timeout
        self.limits = limits or CacheLimits()
        #: Waiting for another process's build of the same key: its conda step and its
        #: pip step are each bounded by the build time limit; a minute of margin.
        self.build_wait = 2 * pip_timeout + 60
        #: Set by whoever holds environments without using them (warm kernels, the
        #: background bytecode pass): called with a key the cache wants to remove or
        #: rebuild, so they let go.
        self.on_reclaim: Callable[[str], Awaitable[None]] | None = None
        self.last_sweep: SweepReport | None = None
        self._locks = KeyedLocks()
        self._leases: dict[str, set[EnvLease]] = {}
        self._markers: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}
        self._python_ok: dict[str, tuple[int, int, int]] = {}
        self._writable: bool | None = None
        self._maintenance: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    @property
    def envs_dir(self) -> Path:
        return self.layout.envs_dir

    def key_for(self, spec: EnvSpec) -> str:
        return spec.cache_key(channel_alias=self.channel_alias, platform=self.platform)

    def prefix_for(self, key: str) -> Path:
        try:
            return self.layout.prefix(key)
        except ValueError as error:
            raise EnvironmentBuildError(str(error)) from None

    # ------------------------------------------------------------------ acquire
    async def acquire(self, spec: EnvSpec, progress: Progress, *, touch: bool = True) -> EnvLease:
        """A lease on a ready, checked environment for ``spec``, built if needed.

        ``touch=False`` takes the lease without counting as a use (for a warm pool).
        """
        self.start_maintenance()
        progress = _redacting(progress)
        key = self.key_for(spec)
        lease, problem = await self._try_reuse(key, touch)
        if lease is None:
            async with self._locks.hold(key):
                lease = await self._acquire_locked(spec, key, touch, progress, problem)
        if lease.reused:
            try:
                await progress(
                    {
                        "type": "info",
                        "stage": "environment",
                        "message": f"Reusing cached environment {key}",
                    }
                )
            except BaseException:
                lease.release_now()
                raise
        return lease

    async def _try_reuse(self, key: str, touch: bool) -> tuple[EnvLease | None, str | None]:
        """The lease on a whole, ready environment, or why not (``None``: not built)."""
        lock, problem, signature = await off_loop(
            self._reuse_sync, key, touch, abandon=lambda r: r[0] and r[0].release()
        )
        if lock is None:
            return None, problem
        try:
            problem = await self._python_problem(key, signature)
        except BaseException:
            lock.release()
            raise
        if problem:
            lock.release()
            return None, problem
        return self._lease(key, lock, reused=True, touch=touch), None

    def _reuse_sync(
        self, key: str, touch: bool
    ) -> tuple[LockFile | None, str | None, tuple[int, int, int] | None]:
        if marker_signature(self.layout.prefix(key)) is None:
            return None, None, None  # not built (or half-built): no lease file needed
        writable = self._is_writable()
        path = self.layout.lease_path(key)
        try:
            for _ in range(LEASE_RETRIES):
                lock = LockFile.try_lock(path, SHARED, create=writable)
                if lock is not None:
                    break
                time.sleep(0.005)  # a deletion's rename or an "in use?" probe: moments
            else:
                return None, None, None  # being removed or rebuilt: the slow path waits
        except FileNotFoundError:  # someone deleted .meta: the slow path prepares again
            self._writable = None
            return None, None, None
        try:
            signature, problem = self._inspect(key)  # now that nobody can remove it
            if signature is None or problem:
                lock.release()
                return None, problem, None
            if touch and writable:
                lock.touch()
            return lock, None, signature
        except BaseException:
            lock.release()
            raise

    def _inspect(self, key: str) -> tuple[tuple[int, int, int] | None, str | None]:
        """The marker signature of ``key`` (``None``: not built) and what is wrong with it."""
        prefix = self.layout.prefix(key)
        signature = marker_signature(prefix)
        if signature is None:
            return None, None
        problem = check(prefix, self._marker(key, prefix, signature))
        if problem:
            self._python_ok.pop(key, None)
        return signature, problem

    def _marker(self, key: str, prefix: Path, signature: tuple[int, int, int]) -> dict[str, Any]:
        """The parsed marker, read again only when the file changed (a rebuild)."""
        cached = self._markers.get(key)
        if cached and cached[0] == signature:
            return cached[1]
        marker = read_marker(prefix) or {}
        self._remember(self._markers, key, (signature, marker))
        return marker

    async def _python_problem(self, key: str, signature: tuple[int, int, int] | None) -> str | None:
        """Whether the python of this build of ``key`` starts, checked once per process."""
        if signature is None or self._python_ok.get(key) == signature:
            return None
        if not await self._python_starts(self.layout.prefix(key)):
            return "its python does not start"
        self._remember(self._python_ok, key, signature)
        return None

    async def _acquire_locked(
        self, spec: EnvSpec, key: str, touch: bool, progress: Progress, problem: str | None
    ) -> EnvLease:
        """Under the key's in-process lock: wait for the build lock, look again, build."""
        self._writable = await asyncio.to_thread(self.layout.prepare)
        if not self._writable:
            lease, again = await self._try_reuse(key, touch)
            if lease is not None:
                return lease
            raise EnvironmentBuildError(
                f"The environment cache {self.envs_dir} is read-only and has no usable "
                f"environment {key} ({again or problem or 'it was never built there'}). A "
                "read-only cache (for example one built into an image) serves only the "
                "environments built into it: build this spec into it, or set "
                "CONDA_CACHE_DIR to a writable folder."
            )

        async def say_waiting() -> None:
            await progress(
                {
                    "type": "info",
                    "stage": "environment",
                    "message": f"Waiting for another build of environment {key}",
                }
            )

        try:
            build = await wait_for_lock(
                self.layout.build_path(key),
                EXCLUSIVE,
                timeout=self.build_wait,
                on_wait=say_waiting,
            )
        except TimeoutError as error:
            raise EnvironmentBuildError(
                f"Environment {key} is being built by another process on the same cache "
                f"folder, and was not ready after {self.build_wait:.0f} s. Try again later."
            ) from error
        try:
            lease, again = await self._try_reuse(key, touch)
            if lease is not None:
                return lease  # built (or repaired) by someone else while we waited
            problem = again or problem
            exclusive = await self._exclusive_lease(key, problem)
            try:
                # Nobody else can use or change it now: look once more, so a whole
                # environment is never rebuilt because a look above was unlucky.
                signature, problem = await asyncio.to_thread(self._inspect, key)
                problem = problem or await self._python_problem(key, signature)
                if signature is not None and not problem:
                    await asyncio.to_thread(_share, exclusive, touch)
                    return self._lease(key, exclusive, reused=True, touch=touch)
                seconds = await self._build(spec, key, progress, problem)
                await asyncio.to_thread(_share, exclusive, touch)
            except BaseException:
                _forget_lock_files(self.layout.prefix(key), exclusive, build)
                exclusive.release()
                raise
        finally:
            build.release()
        self._wake_sweep()  # after every build, off this start's path
        return self._lease(key, exclusive, reused=False, touch=touch, build_seconds=seconds)

    async def _exclusive_lease(self, key: str, problem: str | None) -> LockFile:
        """The lease lock, exclusively: nobody may use what is about to be replaced."""
        path = self.layout.lease_path(key)
        deadline = time.monotonic() + REBUILD_WAIT
        asked = False
        while True:
            lock = await off_loop(
                LockFile.try_lock, path, EXCLUSIVE, abandon=lambda lk: lk and lk.release()
            )
            if lock is not None:
                return lock
            if not asked and self.on_reclaim is not None:
                asked = True
                with contextlib.suppress(Exception):
                    await self.on_reclaim(key)
            if time.monotonic() > deadline:
                raise EnvironmentBuildError(
                    f"Cached environment {key} cannot be used ({problem or 'incomplete'}), "
                    "and it cannot be rebuilt now because sessions (on this worker or "
                    "another sharing its cache) still use it. Stop them, then start again."
                )
            await asyncio.sleep(0.1)

    async def _build(
        self, spec: EnvSpec, key: str, progress: Progress, problem: str | None
    ) -> float:
        """Build ``key`` from scratch (holding its build lock and its lease exclusively)."""
        prefix = self.layout.prefix(key)
        if problem:
            logger.warning("Cached environment %s is damaged (%s); rebuilding it", key, problem)
            await progress(
                {
                    "type": "warning",
                    "stage": "environment",
                    "message": f"Cached environment {key} failed validation ({problem}); "
                    "rebuilding it",
                }
            )
        if await asyncio.to_thread(prefix.exists):
            if not problem:
                logger.warning("Removing half-built environment %s", prefix)
            await asyncio.to_thread(self._discard, prefix)
        describe_spec = spec.describe()
        async with self._build_slot(key, progress):
            return await self._run_build(spec, key, prefix, describe_spec, progress)

    @contextlib.asynccontextmanager
    async def _build_slot(self, key: str, progress: Progress) -> AsyncIterator[None]:
        """One of ``max_concurrent_builds`` slots; a build that must wait says so."""
        slots = self._build_slots
        if slots is None:
            yield
            return
        if slots.locked():
            await progress(
                {
                    "type": "info",
                    "stage": "environment",
                    "message": f"Waiting to build environment {key}: "
                    f"{self.max_concurrent_builds} other build(s) are running, the most this "
                    "worker runs at once (CONDA_MAX_CONCURRENT_BUILDS)",
                }
            )
        async with slots:
            yield

    async def _run_build(
        self,
        spec: EnvSpec,
        key: str,
        prefix: Path,
        describe_spec: dict[str, list[str]],
        progress: Progress,
    ) -> float:
        await progress(
            {
                "type": "info",
                "stage": "environment",
                "message": f"Building environment {key} with {self.builder.name}: "
                + ", ".join(describe_spec["conda"] + describe_spec["pip"]),
            }
        )
        started = time.monotonic()
        try:
            await self.builder.build(spec, prefix, progress)
            await install_pip_packages(prefix, spec.pip, progress, self.pip_timeout)
            if self.finish is not None:
                await self.finish(prefix, progress)
            await asyncio.to_thread(write_marker, prefix, key, describe_spec, self.builder.name)
        except BaseException as error:
            # Failed or cancelled: leave nothing that could be mistaken for an environment.
            await asyncio.shield(asyncio.to_thread(self._discard, prefix))
            if isinstance(error, EnvironmentBuildError):
                # Solver and pip messages may quote a channel URL with its token.
                raise EnvironmentBuildError(redact(str(error))) from None
            raise
        seconds = time.monotonic() - started
        self._python_ok.pop(key, None)
        await progress(
            {
                "type": "success",
                "stage": "environment",
                "message": f"Environment {key} built in {seconds:.1f} s",
            }
        )
        return seconds

    def _discard(self, prefix: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            target = self.layout._to_trash(prefix)
            force_rmtree(target)

    async def _python_starts(self, prefix: Path) -> bool:
        try:
            process = await asyncio.create_subprocess_exec(
                str(prefix / "bin" / "python"),
                "-I",
                "-c",
                "pass",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                env=clean_env(prefix),
            )
        except OSError:
            return False
        try:
            return await asyncio.wait_for(process.wait(), PYTHON_CHECK_TIMEOUT) == 0
        except asyncio.TimeoutError:  # the builtin only from Python 3.11
            return False
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    # ------------------------------------------------------------------ leases
    def _lease(
        self, key: str, lock: LockFile, *, reused: bool, touch: bool, build_seconds: float = 0.0
    ) -> EnvLease:
        lease = EnvLease(
            key=key,
            prefix=self.layout.prefix(key),
            reused=reused,
            build_seconds=build_seconds,
            touch=touch,
            _lock=lock,
            _cache=self,
        )
        self._leases.setdefault(key, set()).add(lease)
        return lease

    def _forget(self, lease: EnvLease) -> None:
        holders = self._leases.get(lease.key)
        if holders is not None:
            holders.discard(lease)
            if not holders:
                del self._leases[lease.key]

    def _released(self, key: str) -> None:
        """A holder of ``key`` let go: if the last sweep had to keep it because it was in
        use or due to be given back, and what holds it now (if anything) is only what
        this worker can give back (warm kernels, the background bytecode pass), sweep
        again now rather than at the next interval."""
        report = self.last_sweep
        if report is None or key not in (*report.kept_in_use, *report.to_reclaim):
            return
        if not any(lease.touch for lease in self._leases.get(key, ())):
            self._wake_sweep()

    def leases_held(self) -> dict[str, int]:
        """Live leases of this process, by key."""
        return {key: len(holders) for key, holders in self._leases.items()}

    # ------------------------------------------------------------------ maintenance
    def start_maintenance(self) -> None:
        """Start the periodic sweep (the first one at once: it also clears what a killed
        run left). Idempotent; needs a running event loop."""
        if self._maintenance is not None and not self._maintenance.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._wake = asyncio.Event()
        self._maintenance = loop.create_task(self._maintain(), name="conda-env-cache-sweep")

    def _wake_sweep(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _maintain(self) -> None:
        assert self._wake is not None
        while True:
            report = await self.sweep_now()
            if report.read_only:
                logger.info(
                    "Environment cache %s is read-only: environments in it are reused, "
                    "nothing is built or evicted there.",
                    self.envs_dir,
                )
                return
            # Not asyncio.wait_for: on Python < 3.12 it can swallow the cancellation that
            # close() sends when the event is set at the same moment, and never return.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.limits.sweep_interval)
            finally:
                waiter.cancel()
            self._wake.clear()

    async def sweep_now(self) -> SweepReport:
        """One sweep (eviction and crash leftovers), in a thread; never raises."""
        # Held here only by warm kernels or background work (no use, no session): those
        # environments keep their turn to go, once their holders let go.
        reclaimable = frozenset(
            key
            for key, holders in self._leases.items()
            if holders and not any(lease.touch for lease in holders)
        )
        try:
            report = await asyncio.to_thread(
                sweep, self.layout, self.limits, reclaimable=reclaimable
            )
        except Exception:
            logger.exception("Environment cache sweep of %s failed", self.envs_dir)
            return SweepReport()
        self.last_sweep = report
        if report.to_reclaim and self.on_reclaim is not None:
            for key in report.to_reclaim:
                with contextlib.suppress(Exception):
                    await self.on_reclaim(key)
            if any(not self._leases.get(key) for key in report.to_reclaim):
                self._wake_sweep()  # they let go: try again at once (only then, no spin)
        return report

    async def close(self) -> None:
        """Stop the sweeps and release every lease still held (worker shutdown)."""
        task, self._maintenance = self._maintenance, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for holders in list(self._leases.values()):
            for lease in list(holders):
                await lease.release()

    # ------------------------------------------------------------------ operators
    async def list_environments(self) -> list[dict[str, Any]]:
        """Every environment in the cache folder (see ``eviction.describe``)."""
        return await asyncio.to_thread(describe, self.layout, local_leases=self.leases_held())

    async def remove(self, key: str) -> Removal:
        """Remove one environment now, unless something uses or builds it."""
        return await asyncio.to_thread(self.layout.remove, key)

    # ------------------------------------------------------------------ helpers
    def _is_writable(self) -> bool:
        if self._writable is None:
            self._writable = self.layout.prepare()
        return self._writable

    @staticmethod
    def _remember(memo: dict, key: str, value: object) -> None:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        memo[key] = value


def _redacting(progress: Progress) -> Progress:
    """Progress messages without credentials (builders may quote channel URLs)."""

    async def forward(message: dict[str, Any]) -> None:
        text = message.get("message")
        if isinstance(text, str):
            clean = redact(text)
            if clean != text:
                message = {**message, "message": clean}
        await progress(message)

    return forward
