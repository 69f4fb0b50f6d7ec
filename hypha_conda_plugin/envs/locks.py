"""Locks for a cache folder that several processes (and machines) share.

Every cross-process promise of the cache is an advisory ``flock`` on a small file:

* held while the process that took it lives, and released by the kernel when that
  process dies however it dies, so a crash can never leave a lock held;
* shared (many holders) or exclusive (one holder, no shared ones), which is exactly
  "in use" versus "being built or deleted";
* per open file description, so two leases in one process are two independent locks
  and an exclusive attempt in the same process sees the shared ones.

A lock file may be deleted by whoever holds it exclusively (so the folder of lock files
does not grow forever). Someone who opened the old file just before could then lock a
file that no longer has a name; ``LockFile.try_lock`` notices (the inode at the path is
not the one it locked) and starts over with the file now at the path.

Waiting is polling with ``LOCK_NB`` from the event loop's side: a blocking ``flock`` in a
worker thread cannot be cancelled, and twenty waiters would take every thread of the
default executor that the whole Hypha server shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

SHARED = fcntl.LOCK_SH
EXCLUSIVE = fcntl.LOCK_EX
#: errno values that mean "this folder cannot be written here" (a read-only image
#: layer, a read-only mount, or permissions), as opposed to a real failure.
READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)

T = TypeVar("T")


class LockFile:
    """One open of a lock file, holding a shared or exclusive ``flock`` on it.

    ``fd is None`` is a lock that could not be taken because the folder is read-only and
    the file does not exist there: nobody who uses that folder can delete anything in it
    either, so there is nothing the lock would have to protect against.
    """

    __slots__ = ("fd", "mode", "path")

    def __init__(self, path: Path, fd: int | None, mode: int) -> None:
        self.path = path
        self.fd = fd
        self.mode = mode

    @property
    def real(self) -> bool:
        return self.fd is not None

    @classmethod
    def try_lock(cls, path: Path, mode: int, *, create: bool = True) -> LockFile | None:
        """Lock ``path`` (created 0600 if needed) without waiting; ``None`` if held.

        ``create=False``: a file that does not exist is nobody's lock; the result then
        holds nothing (``real`` is false).
        """
        while True:
            fd = _open(path, create)
            if fd is None:
                return cls(path, None, mode)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                at_path = os.stat(path)
            except FileNotFoundError:
                at_path = None
            mine = os.fstat(fd)
            if at_path is not None and (at_path.st_ino, at_path.st_dev) == (
                mine.st_ino,
                mine.st_dev,
            ):
                return cls(path, fd, mode)
            os.close(fd)  # deleted under us: lock the file that is there now

    def convert(self, mode: int) -> bool:
        """Switch between shared and exclusive without waiting.

        Linux drops the old lock before taking the new one, so a failed attempt leaves
        nothing held; callers that must not lose the lock re-take the old mode. Callers
        that convert hold the key's build lock, so no deleter can step in between.
        """
        if self.fd is None:
            self.mode = mode
            return True
        try:
            fcntl.flock(self.fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.mode = mode
        return True

    def touch(self) -> None:
        """Set the file's modification time to now (the cache's record of last use)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.utime(self.fd)

    def unlink(self) -> None:
        """Delete the file while holding it exclusively (see the module docstring)."""
        if self.fd is not None and self.mode == EXCLUSIVE:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def release(self) -> None:
        """Give the lock up; safe to call twice and from any thread."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock


def _open(path: Path, create: bool) -> int | None:
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | flags, 0o600)
    except FileNotFoundError:
        if not create:
            return None
        raise
    except OSError as error:
        if error.errno not in READ_ONLY_ERRORS:
            raise
    # A read-only folder: an existing file can still be locked through a read-only
    # descriptor, so a worker reading a shared volume still tells writers it uses it.
    try:
        return os.open(path, os.O_RDONLY | flags)
    except OSError as error:
        if error.errno in (*READ_ONLY_ERRORS, errno.ENOENT):
            return None
        raise


def is_locked(path: Path) -> bool:
    """Whether anyone holds ``path`` in any mode (a momentary exclusive probe)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, EXCLUSIVE | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def off_loop(
    function: Callable[..., T], *args: object, abandon: Callable[[T], None] | None = None
) -> T:
    """``asyncio.to_thread`` for work that takes something (a lock, a lease).

    When the caller is cancelled the thread still finishes; ``abandon`` then receives
    what it produced, so a lock taken after nobody wants it is released, not leaked.
    """
    future = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        if abandon is not None:

            def cleanup(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    abandon(done.result())

            future.add_done_callback(cleanup)
        raise


async def wait_for_lock(
    path: Path,
    mode: int,
    *,
    timeout: float,
    on_wait: Callable[[], Awaitable[None]] | None = None,
) -> LockFile:
    """Poll until ``path`` is locked in ``mode``; ``TimeoutError`` after ``timeout`` s.

    ``on_wait`` runs once, the first time the lock is found taken (to tell the user).
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    told = False
    while True:
        lock = await off_loop(LockFile.try_lock, path, mode, abandon=_release)
        if lock is not None:
            return lock
        if not told and on_wait is not None:
            told = True
            await on_wait()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} stayed locked for {timeout:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


def _release(lock: LockFile | None) -> None:
    if lock is not None:
        lock.release()


class KeyedLocks:
    """One ``asyncio.Lock`` per key, forgotten as soon as nobody holds or awaits it, so
    a worker that sees thousands of keys over months keeps only the ones in use."""

    def __init__(self) -> None:
        self._entries: dict[str, list] = {}  # key -> [lock, holders and waiters]

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._entries.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
