"""Complete environments before sessions share them: bytecode, then read-only.

Kernels see their environment read-only (the sandbox binds it so; without a sandbox it
is sealed by permissions), so a ``.pyc`` that is missing is compiled again, in memory, by
every kernel that imports the module: 1.1 s of a 1.2 s kernel start for a fresh
python + ipykernel environment. py-rattler links packages without compiling them (conda
compiles ``noarch: python`` packages at link time), so our environments need it done.

Compiling everything takes seconds (3.5 s for a numpy environment on 2 cores), which a
cold start should not wait for. So it is done in two steps:

1. before the environment is marked ready, the files a kernel imports at start (about
   520, listed in ``kernel_modules.py``) are compiled, split over a few processes: about
   1 s on 2 cores, where a first kernel writing them as it imports took 2 to 2.5 s;
2. once the environment is ready, the rest is compiled in the background at idle
   priority (``completion.py``; it must not slow the kernels it is for), and then the
   environment is sealed (write bits removed), so that without a sandbox a kernel of a
   non-root worker cannot change what other sessions import.

Both run the environment's python as ``python -I -S -m compileall -i -``, one child per
share of the files: it parses files and runs no package code (``-S``: no ``site``, so no
``.pth`` file of a package runs; ``-I``: no variable or user folder of the worker's
changes what it does). compileall's own ``-j`` is not used: its pool's processes are
grandchildren that would outlive a killed worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Collection, Sequence
from pathlib import Path

from hypha_conda_plugin.aio import gather_or_cancel
from hypha_conda_plugin.childenv import clean_env
from hypha_conda_plugin.envs.kernel_modules import KERNEL_START_FILES
from hypha_conda_plugin.envs.prefix import stdlib_dir
from hypha_conda_plugin.sandbox import child_setup

logger = logging.getLogger(__name__)

#: Test suites of packages are never imported by users' code; skip them.
SKIP = r"(/tests?/|/testing/|/idle_test/|/lib2to3/tests/)"
COMPILE_TIMEOUT = 900.0
KERNEL_START_TIMEOUT = 300.0
#: Compiler processes at once; each compiles its share one file after another.
MAX_COMPILERS = 4
#: The kernel's files are on the path of a start (the priority of builds); the rest is
#: not: it runs at idle priority (below kernels), nice 19 where that is refused.
KERNEL_START_NICENESS = 10
BACKGROUND_NICENESS = 19


class CompileFailed(Exception):
    """A compiler child could not start, failed or ran past its time limit."""


async def compile_kernel_start(prefix: Path, timeout: float = KERNEL_START_TIMEOUT) -> int:
    """Compile the bytecode of what a kernel imports at start; returns how many files.

    A failure only costs kernels import time (they compile in memory what has no
    bytecode), so it is logged, not raised; cancellation kills the compilers.
    """
    shares = await asyncio.to_thread(lambda: _plan(kernel_start_files(prefix)))
    try:
        await _compile_shares(prefix, shares, KERNEL_START_NICENESS, timeout)
    except CompileFailed as error:
        logger.warning("Kernel bytecode of %s not (all) compiled: %s", prefix, error)
    return sum(len(share) for share in shares)


async def compile_remaining(
    prefix: Path, first: Collection[str] = (), timeout: float = COMPILE_TIMEOUT
) -> bool:
    """Compile every module of the environment that has no bytecode yet, at idle
    priority: first the files of the conda packages named in ``first`` (what the
    manifest asked for, so likely what the next cells import), then everything else.

    Returns whether it finished; a failure only costs later kernels some import time.
    """
    try:
        if first:
            shares = await asyncio.to_thread(lambda: _plan(package_sources(prefix, first)))
            await _compile_shares(prefix, shares, None, timeout)
        shares = await asyncio.to_thread(lambda: _plan(python_sources(prefix / "lib")))
        await _compile_shares(prefix, shares, None, timeout)
    except CompileFailed as error:
        logger.warning("Could not compile bytecode in %s: %s", prefix, error)
        return False
    return True


def kernel_start_files(prefix: Path) -> list[Path]:
    """The files of ``KERNEL_START_FILES`` this environment has (blocking)."""
    stdlib = stdlib_dir(prefix)
    if stdlib is None:
        return []
    roots = {"std": stdlib, "site": stdlib / "site-packages"}
    found = []
    for entry in KERNEL_START_FILES:
        tag, _, relative = entry.partition("/")
        path = roots[tag] / relative
        if path.is_file():
            found.append(path)
    return found


def python_sources(lib: Path) -> list[Path]:
    """Every ``.py`` file below ``lib`` but test suites (blocking). compileall itself
    skips those whose bytecode is up to date."""
    skip = re.compile(SKIP)
    found = []
    for root, _dirs, files in os.walk(lib):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                if not skip.search(path):
                    found.append(Path(path))
    return found


def package_sources(prefix: Path, names: Collection[str]) -> list[Path]:
    """The ``.py`` files that the conda packages ``names`` installed, from their records
    in ``conda-meta`` (blocking)."""
    skip = re.compile(SKIP)
    found = []
    for record in (prefix / "conda-meta").glob("*.json"):
        if not any(record.name.startswith(f"{name}-") for name in names):
            continue  # conda-meta/<name>-<version>-<build>.json: only read those named
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("name") in names:
            for file in meta.get("files") or ():
                if isinstance(file, str) and file.endswith(".py") and not skip.search(file):
                    found.append(prefix / file)
    return found


def _plan(files: Sequence[Path]) -> list[list[Path]]:
    return split_by_size(files, min(MAX_COMPILERS, os.cpu_count() or 1))


def split_by_size(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``files`` in at most ``parts`` shares of about the same total size (largest first,
    each to the lightest share), so the compilers finish together (blocking: stats)."""
    shares: list[list[Path]] = [[] for _ in range(max(1, parts))]
    loads = [0] * len(shares)
    sized = sorted(((_size(f), f) for f in files), key=lambda pair: pair[0], reverse=True)
    for size, path in sized:
        lightest = loads.index(min(loads))
        shares[lightest].append(path)
        loads[lightest] += size
    return [share for share in shares if share]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


async def _compile_shares(
    prefix: Path, shares: Sequence[Sequence[Path]], niceness: int | None, timeout: float
) -> None:
    """One compiler child per share, at once. They are the worker's own children, never
    compileall's ``-j`` pool: a pool's processes would not die with the worker."""
    await gather_or_cancel(_compile(prefix, share, niceness, timeout) for share in shares)


async def _compile(
    prefix: Path, files: Sequence[Path], niceness: int | None, timeout: float
) -> None:
    """Run the environment's compileall on ``files`` (names on its stdin); the child dies
    with the worker and is killed with its group on a timeout or a cancel. ``niceness``
    None: idle priority (see ``child_setup``)."""
    argv = [str(prefix / "bin" / "python"), "-I", "-S", "-m", "compileall", "-q", "-i", "-"]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=clean_env(prefix),
            start_new_session=True,
            preexec_fn=child_setup(
                None,
                die_with_parent=True,
                niceness=BACKGROUND_NICENESS if niceness is None else niceness,
                idle=niceness is None,
            ),
        )
    except OSError as error:
        raise CompileFailed(str(error)) from error
    names = "".join(f"{path}\n" for path in files).encode()
    try:
        await asyncio.wait_for(process.communicate(names), timeout)
    except asyncio.TimeoutError:
        _kill(process)
        await process.wait()
        raise CompileFailed(f"killed after {timeout:.0f} s") from None
    except BaseException:  # cancelled (worker shutdown, eviction): stop it
        _kill(process)
        with contextlib.suppress(Exception):
            await process.wait()
        raise
    # compileall exits 1 when one file does not compile (a package's deliberately
    # broken test data, Python 2 leftovers): everything else was still written.
    if process.returncode not in (0, 1):
        raise CompileFailed(f"compileall exited with {process.returncode}")


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 9)


def seal(prefix: Path) -> None:
    """Remove write permission from everything in the environment (runs in a thread).

    Eviction restores it before deleting (``instances.remove_tree``).
    """
    read_only = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    for root, dirs, files in os.walk(prefix):
        for name in (*files, *dirs):
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                mode = os.lstat(path).st_mode
                if not stat.S_ISLNK(mode):
                    os.chmod(path, stat.S_IMODE(mode) & read_only)
    with contextlib.suppress(OSError):
        os.chmod(prefix, stat.S_IMODE(os.lstat(prefix).st_mode) & read_only)
