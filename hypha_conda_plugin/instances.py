"""Folders on disk: one run folder per worker process, one instance folder per kernel.

Layout under the configured working folder (every folder 0700)::

    WORKING_DIR/
      r-1a2b3c4d.lock        flock held by the live worker run that owns r-1a2b3c4d/
      r-1a2b3c4d/
        5e6f7a8b/            one instance: a kernel and, once handed out, its session
          work/              the session's working folder (cwd, files_to_stage)
          home/              HOME: IPYTHONDIR, JUPYTER_*, XDG_*, pip's user site
          tmp/               TMPDIR, and /tmp inside the sandbox
          k/                 kernelspec, connection file, ZeroMQ sockets, kernel log
          etc/               passwd and group shown inside the sandbox

Why instances rather than folders named after sessions: a warm kernel is started before
anyone knows which session it will serve, so its folder cannot carry the session's name;
and a retried start of a failed session id gets new folders, so it never races the
cleanup of the failed attempt. The kernel sees its instance folder at the same path
inside and outside the sandbox, so cwd, ``HOME`` and the connection file mean the same
in both modes.

Why a run folder with a lock: when a worker is killed, its folders stay. The next worker
on the same working folder sweeps every run folder whose lock nobody holds (a lock dies
with its process), and leaves alone those of other live workers sharing the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hypha_conda_plugin.envs.store import force_rmtree
from hypha_conda_plugin.sandbox import SANDBOX_USER, passwd_lines

logger = logging.getLogger(__name__)

RUN_PREFIX = "r-"
LOCK_SUFFIX = ".lock"
#: Marks every kernel process with its run, so a sweep without a sandbox finds orphans.
RUN_MARKER_VARIABLE = "HYPHA_CONDA_RUN"


class WorkingRootError(RuntimeError):
    """The working folder is unusable (not ours, a link, not writable)."""


@dataclass(frozen=True)
class Instance:
    """One kernel's folders. Pure path arithmetic; :meth:`create` makes them."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def kernel_dir(self) -> Path:
        return self.root / "k"

    @property
    def passwd_file(self) -> Path:
        return self.root / "etc" / "passwd"

    def kernel_env(self) -> dict[str, str]:
        """Variables that give the kernel private per-session folders for everything that
        would otherwise land in a shared HOME (IPython startup files, caches, pip)."""
        home = self.home
        env = {
            "HOME": str(home),
            "USER": SANDBOX_USER,
            "LOGNAME": SANDBOX_USER,
            "TMPDIR": str(self.tmp),
            "IPYTHONDIR": str(home / ".ipython"),
            "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
            "JUPYTER_DATA_DIR": str(home / ".local" / "share" / "jupyter"),
            "JUPYTER_RUNTIME_DIR": str(home / ".local" / "share" / "jupyter" / "runtime"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "MPLCONFIGDIR": str(home / ".config" / "matplotlib"),
            # %pip install lands in this session's user site (under HOME), never in the
            # shared, read-only environment; it goes when the session's folder goes.
            "PIP_USER": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PYTHONUSERBASE": str(home / ".local"),
        }
        return env

    def user_site(self, python_version: str) -> Path:
        return self.home / ".local" / "lib" / f"python{python_version}" / "site-packages"

    def create(self, python_version: str | None) -> None:
        """Make the folders (0700). Runs in a thread.

        The user site folder must exist before the kernel starts: Python adds it to
        ``sys.path`` only if it exists then, so a later ``%pip install`` is importable
        in the running kernel without a restart.
        """
        for folder in (self.root, self.work, self.home, self.tmp, self.kernel_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.passwd_file.parent.mkdir(mode=0o700, exist_ok=True)
        passwd, group = passwd_lines(self.home)
        self.passwd_file.write_text(passwd)
        self.passwd_file.with_name("group").write_text(group)
        if python_version:
            self.user_site(python_version).mkdir(mode=0o700, parents=True, exist_ok=True)

    def remove(self) -> None:
        """Delete everything (runs in a thread); copes with read-only folders a cell made."""
        remove_tree(self.root)


class WorkingRoot:
    """The working folder and this worker run's own folder in it."""

    def __init__(self, working_dir: Path) -> None:
        self.working_dir = working_dir
        self.run_id = RUN_PREFIX + secrets.token_hex(4)
        self.run_dir = working_dir / self.run_id
        self._lock: IO[str] | None = None

    def new_instance(self) -> Instance:
        """A fresh instance folder name (not yet created): no file system access."""
        return Instance(self.run_dir / secrets.token_hex(4))

    async def open(self) -> list[str]:
        """Create and lock this run's folder, sweep dead runs; returns what was swept."""
        return await asyncio.to_thread(self._open)

    def _open(self) -> list[str]:
        _private_dir(self.working_dir)
        self.run_dir.mkdir(mode=0o700)
        lock = (self.working_dir / (self.run_id + LOCK_SUFFIX)).open("a")
        os.chmod(lock.name, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock = lock
        return sweep_dead_runs(self.working_dir, keep=self.run_id)

    async def close(self) -> None:
        """Remove this run's folder and release its lock (worker shutdown)."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        remove_tree(self.run_dir)
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock.name)
            self._lock.close()
            self._lock = None


def sweep_dead_runs(working_dir: Path, keep: str | None = None) -> list[str]:
    """Delete run folders whose owner died (lock free) and kill what they left running.

    Safe when several workers share ``working_dir``: a live run holds its lock, so its
    folder is never touched. Runs in a thread.
    """
    swept: list[str] = []
    for entry in sorted(working_dir.iterdir()):
        name = entry.name
        if not name.startswith(RUN_PREFIX) or name.endswith(LOCK_SUFFIX) or name == keep:
            continue
        lock_path = working_dir / (name + LOCK_SUFFIX)
        with _try_lock(lock_path) as free:
            if not free:
                continue
            kill_orphans(name)
            remove_tree(entry)
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
        swept.append(name)
    for lock_path in working_dir.glob(f"{RUN_PREFIX}*{LOCK_SUFFIX}"):
        run = lock_path.name.removesuffix(LOCK_SUFFIX)
        if run != keep and not (working_dir / run).exists():
            with _try_lock(lock_path) as free, contextlib.suppress(FileNotFoundError):
                if free:
                    lock_path.unlink()
    if swept:
        logger.info("Swept %d folder(s) left by earlier worker runs: %s", len(swept), swept)
    return swept


@contextlib.contextmanager
def _try_lock(path: Path):
    """Yield True when nobody holds ``path``'s lock (then we hold it for the block)."""
    try:
        handle = path.open("a")
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        handle.close()


def kill_orphans(run_id: str) -> int:
    """SIGKILL processes a dead run's kernels left (found by their run marker variable).

    With the sandbox, kernels die with the worker and this finds nothing; without it, a
    cell's ``setsid`` child survives its kernel, and this is what ends it.
    """
    marker = f"{RUN_MARKER_VARIABLE}={run_id}".encode()
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), 9)
                killed += 1
    if killed:
        logger.info("Killed %d process(es) left by worker run %s", killed, run_id)
    return killed


def remove_tree(path: Path) -> None:
    """Delete a folder, also where a cell took write permission away (runs in a thread)."""
    if os.path.lexists(path):
        force_rmtree(path)


def _private_dir(path: Path) -> None:
    """Create the working folder 0700, or check an existing one is ours and not a link."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise WorkingRootError(f"The working folder {path} is not a plain folder; choose another.")
    if info.st_uid != os.getuid():
        raise WorkingRootError(
            f"The working folder {path} belongs to uid {info.st_uid}, not to this worker "
            f"(uid {os.getuid()}); set CONDA_WORKING_DIR to a folder of its own."
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
