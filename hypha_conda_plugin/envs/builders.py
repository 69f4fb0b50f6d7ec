"""How environments get built: a small Builder protocol and its implementations.

The embedded ``RattlerBuilder`` needs nothing installed on the machine. Builds always
run in a child process: a solver crash, a hang or a cancelled request then costs one
child, never the Hypha server that hosts the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.childenv import clean_env
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import EnvironmentBuildError

logger = logging.getLogger(__name__)


STDERR_TAIL_LINES = 40


@dataclass(frozen=True)
class BuildResult:
    packages: tuple[str, ...]


class Builder(Protocol):
    """Creates a conda environment at ``prefix`` from ``spec``.

    Implementations must not block the event loop, must leave nothing running when
    cancelled, and raise ``EnvironmentBuildError`` with a user-facing message on failure.
    Cleaning up a half-built prefix is the caller's job (the cache owns the folder).
    """

    name: str

    async def build(self, spec: EnvSpec, prefix: Path, progress: Progress) -> BuildResult: ...


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill a child started in its own session, and everything it started."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await process.wait()


async def _drain(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    async for raw in stream:
        tail.append(raw.decode(errors="replace").rstrip())


class RattlerBuilder:
    """Solves and installs with py-rattler in a child Python process."""

    name = "rattler"

    def __init__(
        self,
        *,
        pkgs_dir: Path,
        repodata_cache_dir: Path,
        channel_alias: str | None,
        timeout: float,
    ) -> None:
        self.pkgs_dir = pkgs_dir
        self.repodata_cache_dir = repodata_cache_dir
        self.channel_alias = channel_alias
        self.timeout = timeout

    async def build(self, spec: EnvSpec, prefix: Path, progress: Progress) -> BuildResult:
        job = {
            "prefix": str(prefix),
            "pkgs_dir": str(self.pkgs_dir),
            "repodata_cache_dir": str(self.repodata_cache_dir),
            "channels": list(spec.channels),
            "channel_alias": self.channel_alias,
            "specs": list(spec.conda),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hypha_conda_plugin.envs.rattler_child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=clean_env(extra={"PYTHONPATH": _package_root()}, pip_mirror=False),
        )
        stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        drain = asyncio.create_task(_drain(process.stderr, stderr_tail))
        try:
            process.stdin.write(json.dumps(job).encode())
            await process.stdin.drain()
            process.stdin.close()
            outcome = await asyncio.wait_for(self._follow(process, progress), self.timeout)
            await process.wait()
        except asyncio.TimeoutError as error:  # the builtin only from Python 3.11
            raise EnvironmentBuildError(
                f"Building the environment took longer than {self.timeout:.0f} s and was "
                "stopped. Pin versions to make the solve smaller, or raise "
                "CONDA_BUILD_TIMEOUT."
            ) from error
        finally:
            await _kill_group(process)
            await asyncio.wait({drain}, timeout=5)
            drain.cancel()
        return self._result(outcome, process.returncode, stderr_tail, spec)

    @staticmethod
    async def _follow(process: asyncio.subprocess.Process, progress: Progress) -> dict | None:
        outcome: dict | None = None
        async for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                logger.debug("rattler child: %s", raw.decode(errors="replace").rstrip())
                continue
            if event.get("event") == "progress":
                await progress(
                    {
                        "type": "info",
                        "stage": f"build:{event.get('stage')}",
                        "message": event.get("message", ""),
                        "progress": event.get("progress"),
                    }
                )
            elif event.get("event") in ("done", "error"):
                outcome = event
        return outcome

    @staticmethod
    def _result(
        outcome: dict | None, returncode: int | None, stderr_tail: deque[str], spec: EnvSpec
    ) -> BuildResult:
        if outcome and outcome["event"] == "done":
            return BuildResult(packages=tuple(outcome.get("packages", ())))
        if outcome and outcome["event"] == "error":
            kind, message = outcome.get("kind"), outcome.get("message", "")
            hints = {
                "spec": "Fix the entry in the manifest's 'dependencies'.",
                "channel": "Fix the manifest's 'channels'.",
                "solve": (
                    f"Check that every package exists in channels {list(spec.channels)} "
                    "and that the version constraints can be met together."
                ),
                "install": "Check that the channels are reachable and the disk has space.",
            }
            hint = hints.get(kind, "This is a bug in the worker; please report it.")
            raise EnvironmentBuildError(f"Environment build failed ({kind}): {message}\n{hint}")
        detail = "\n".join(stderr_tail) or "no output"
        raise EnvironmentBuildError(
            f"The environment builder exited unexpectedly (code {returncode}):\n{detail}"
        )


async def install_pip_packages(
    prefix: Path, requirements: Sequence[str], progress: Progress, timeout: float
) -> None:
    """Run the environment's own pip for the manifest's ``{"pip": [...]}`` item."""
    if not requirements:
        return
    await progress(
        {"type": "info", "stage": "build:pip", "message": f"pip install {' '.join(requirements)}"}
    )
    python = prefix / "bin" / "python"
    process = await asyncio.create_subprocess_exec(
        str(python),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--no-warn-script-location",
        *requirements,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env=clean_env(prefix, pip_mirror=True),
    )
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    try:
        await asyncio.wait_for(_drain(process.stdout, tail), timeout)
        code = await process.wait()
    except asyncio.TimeoutError as error:  # the builtin only from Python 3.11
        raise EnvironmentBuildError(
            f"pip install took longer than {timeout:.0f} s and was stopped."
        ) from error
    finally:
        await _kill_group(process)
    if code != 0:
        raise EnvironmentBuildError(
            f"pip install {' '.join(requirements)} failed (exit {code}). Check the "
            "manifest's pip requirements. pip said:\n" + "\n".join(tail)
        )


def _package_root() -> str:
    """The folder holding ``hypha_conda_plugin``, so the child imports this very copy."""
    return str(Path(__file__).resolve().parents[2])
