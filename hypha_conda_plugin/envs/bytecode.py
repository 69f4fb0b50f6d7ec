"""Complete environments before sessions share them: bytecode, then read-only.

Kernels see their environment read-only (the sandbox binds it so; without a sandbox it
is sealed by permissions), so a ``.pyc`` that is missing is compiled again, in memory, by
every kernel that imports the module: 1.1 s of a 1.2 s kernel start for a fresh
python + ipykernel environment. py-rattler links packages without compiling them (conda
compiles ``noarch: python`` packages at link time), so our environments need it done.

Compiling everything takes seconds (3.5 s for a numpy environment on 2 cores), which a
cold start should not wait for. So it is done in two steps:

1. before the environment is marked ready, a kernel is started once in it, sandboxed but
   with the environment writable (see ``KernelLauncher.warm_bytecode``): it writes the
   bytecode of exactly what a kernel imports at start, at the cost the first session's
   kernel used to pay anyway;
2. once the environment is ready, the rest is compiled in the background at low
   priority (a ``compileall`` child: it parses files, it runs no package code), and then
   the environment is sealed (write bits removed), so that without a sandbox a kernel of
   a non-root worker cannot change what other sessions import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path

from hypha_conda_plugin.childenv import clean_env

logger = logging.getLogger(__name__)

#: Test suites of packages are never imported by users' code; skip them.
SKIP = r"(/tests?/|/testing/|/idle_test/|/lib2to3/tests/)"
COMPILE_TIMEOUT = 900.0


async def compile_remaining(prefix: Path, timeout: float = COMPILE_TIMEOUT) -> bool:
    """Compile every module of the environment that has no bytecode yet, at low priority.

    Returns whether it finished; a failure only costs later kernels some import time.
    """
    python = prefix / "bin" / "python"
    lib = prefix / "lib"
    argv = [str(python), "-m", "compileall", "-q", "-j", "0", "-x", SKIP, str(lib)]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=clean_env(prefix),
            start_new_session=True,
            preexec_fn=_lower_priority,
        )
    except OSError as error:
        logger.warning("Could not compile bytecode in %s: %s", prefix, error)
        return False
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except BaseException:  # timed out, cancelled (worker shutdown, eviction): stop it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        with contextlib.suppress(Exception):
            await process.wait()
        raise
    return process.returncode == 0


def _lower_priority() -> None:
    os.nice(19)


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
