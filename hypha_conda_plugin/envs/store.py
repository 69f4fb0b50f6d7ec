"""The cache folder on disk: where each environment and its lock files live, and the one
safe way to remove an environment.

::

    envs/<key>/              the environment (its prefix; never moved while in use)
    envs/.meta/     (0700)   <key>.build  exclusive while building or deleting <key>
                             <key>.lease  shared by every user of <key>; its mtime is
                                          the last time a session started (or ended) on it
                             sweep.lock   one sweep at a time across processes
    envs/.trash/    (0700)   environments on their way out

Removing ``<key>`` takes its build lock and its lease lock, both exclusively and without
waiting: anyone building or using it (in any process sharing the folder) makes the
removal fail, never wait. It then renames the prefix into ``.trash`` (one atomic step:
a reader sees the whole environment or nothing) and deletes the lock files while still
holding them, then the folder itself after letting the locks go.

Everything here is blocking file work: callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import sys
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from hypha_conda_plugin.envs.integrity import marker_signature
from hypha_conda_plugin.envs.locks import EXCLUSIVE, READ_ONLY_ERRORS, LockFile

logger = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-z]{1,64}")


class Removal(str, Enum):
    REMOVED = "removed"
    IN_USE = "in use"
    BUILDING = "building"
    MISSING = "missing"
    CHANGED = "changed"  # rebuilt since it was chosen: not the environment that was meant


def is_key(name: str) -> bool:
    return bool(_KEY.fullmatch(name))


@dataclass(frozen=True)
class CacheLayout:
    envs_dir: Path

    @property
    def meta_dir(self) -> Path:
        return self.envs_dir / ".meta"

    @property
    def trash_dir(self) -> Path:
        return self.envs_dir / ".trash"

    @property
    def sweep_lock(self) -> Path:
        return self.meta_dir / "sweep.lock"

    def prefix(self, key: str) -> Path:
        """The environment's folder: a plain child of ``envs_dir`` (already resolved by
        the settings), by path arithmetic alone."""
        if not is_key(key):
            raise ValueError(f"Refusing environment key {key!r}")
        return self.envs_dir / key

    def lease_path(self, key: str) -> Path:
        return self.meta_dir / f"{key}.lease"

    def build_path(self, key: str) -> Path:
        return self.meta_dir / f"{key}.build"

    def legacy_lock(self, key: str) -> Path:
        """Where versions up to 0.1 kept a key's build lock."""
        return self.envs_dir / f".{key}.lock"

    def prepare(self) -> bool:
        """Create the folders (metadata ones 0700); ``False`` if the cache is read-only."""
        try:
            self.envs_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.meta_dir, self.trash_dir):
                folder.mkdir(mode=0o700, exist_ok=True)
                if stat.S_IMODE(folder.stat().st_mode) != 0o700:
                    folder.chmod(0o700)
        except OSError as error:
            if error.errno in READ_ONLY_ERRORS:
                return False
            raise
        return os.access(self.meta_dir, os.W_OK)

    def keys(self) -> list[str]:
        """Names of the environment folders present (ready, building or half-built)."""
        try:
            entries = list(os.scandir(self.envs_dir))
        except FileNotFoundError:
            return []
        return sorted(e.name for e in entries if is_key(e.name) and e.is_dir(follow_symlinks=False))

    def last_used(self, key: str) -> float | None:
        try:
            return os.stat(self.lease_path(key)).st_mtime
        except OSError:
            return None

    def remove(
        self,
        key: str,
        *,
        expect: tuple[int, int, int] | None = None,
        only: Literal["unready", "absent"] | None = None,
    ) -> Removal:
        """Remove environment ``key`` unless anyone builds or uses it (see module doc).

        ``expect``: the marker signature it had when it was chosen; a different one means
        it was rebuilt since, and it stays. ``only="unready"``: remove only a folder
        without a marker (a half-built leftover); ``only="absent"``: only the lock files
        of an environment that does not exist. Either way the condition is checked under
        the locks, so an environment built meanwhile is never touched.
        """
        build = LockFile.try_lock(self.build_path(key), EXCLUSIVE)
        if build is None:
            return Removal.BUILDING
        trash: Path | None = None
        try:
            legacy = LockFile.try_lock(self.legacy_lock(key), EXCLUSIVE, create=False)
            if legacy is None:
                return Removal.BUILDING  # an older worker on the same folder is building
            lease = LockFile.try_lock(self.lease_path(key), EXCLUSIVE)
            if lease is None:
                legacy.release()
                return Removal.IN_USE
            try:
                prefix = self.prefix(key)
                signature = marker_signature(prefix)
                exists = prefix.exists()
                if not exists:
                    outcome = Removal.MISSING
                elif (
                    only == "absent"
                    or (only == "unready" and signature is not None)
                    or (expect is not None and signature != expect)
                ):
                    return Removal.CHANGED
                else:
                    trash = self._to_trash(prefix)
                    outcome = Removal.REMOVED
                for lock in (lease, build, legacy):
                    lock.unlink()
            finally:
                lease.release()
                legacy.release()
        finally:
            build.release()
        if trash is not None:
            force_rmtree(trash)
        return outcome

    def _to_trash(self, prefix: Path) -> Path:
        target = self.trash_dir / f"{prefix.name}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(OSError):
            # Moving a folder to another parent rewrites its "..": it must be writable
            # (sealed environments are not).
            mode = stat.S_IMODE(os.lstat(prefix).st_mode)
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(prefix, mode | stat.S_IRWXU)
        os.rename(prefix, target)
        return target

    def empty_trash(self) -> None:
        """Finish deletions a killed process left (another process may be at the same
        tree: both ignore what the other already removed)."""
        try:
            entries = list(os.scandir(self.trash_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            force_rmtree(Path(entry.path))


def force_rmtree(path: Path) -> None:
    """Delete a folder even where write or search permission was taken away (sealed
    environments); missing files are fine (another process may be deleting too)."""

    def add_owner_rights(folder: str) -> None:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.lstat(folder).st_mode)
            if mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(folder, mode | stat.S_IRWXU)

    stack = [str(path)]
    while stack:  # owner rights on every folder first: rmtree needs r, w and x on each
        folder = stack.pop()
        add_owner_rights(folder)
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))

    def report(function: object, failed: str, error: object) -> None:
        if not isinstance(error, FileNotFoundError):
            logger.warning("Could not delete %s: %s", failed, error)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=report)
    else:
        shutil.rmtree(path, onerror=lambda f, p, info: report(f, p, info[1]))


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path``, each file counted once however many
    names it has inside. Files hard-linked from the package cache count in full: the
    figure is what the environment holds, an upper bound of what removing it frees."""
    seen: set[int] = set()
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(info.st_mode) and info.st_ino not in seen:
                seen.add(info.st_ino)
                total += info.st_size
    return total
