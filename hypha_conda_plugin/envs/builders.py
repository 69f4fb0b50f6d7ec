"""How environments get built: a small Builder protocol and its implementations.

The embedded ``RattlerBuilder`` needs nothing installed on the machine. Builds always
run in a child process: a solver crash, a hang or a cancelled request then costs one
child, never the Hypha server that hosts the worker.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.childenv import clean_env
from hypha_conda_plugin.envs.child_process import ChildTimeout, run_child
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import EnvironmentBuildError, PackageManagerError

logger = logging.getLogger(__name__)


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
        outcome: dict = {}

        async def on_line(raw: bytes) -> None:
            try:
                event = json.loads(raw)
            except ValueError:
                logger.debug("rattler child: %s", raw[:1000].decode(errors="replace").rstrip())
                return
            if not isinstance(event, dict):
                return
            if event.get("event") == "progress":
                await progress(
                    {
                        "type": "info",
                        "stage": f"build:{event.get('stage')}",
                        "message": f"{self.name}: {event.get('message', '')}",
                        "progress": event.get("progress"),
                    }
                )
            elif event.get("event") in ("done", "error"):
                outcome.clear()
                outcome.update(event)

        try:
            result = await run_child(
                [sys.executable, "-m", "hypha_conda_plugin.envs.rattler_child"],
                env=clean_env(extra={"PYTHONPATH": _package_root()}, pip_mirror=False),
                stdin=json.dumps(job).encode(),
                timeout=self.timeout,
                on_stdout=on_line,
            )
        except ChildTimeout as error:
            raise EnvironmentBuildError(
                f"Building the environment took longer than {self.timeout:.0f} s and was "
                "stopped. Pin versions to make the solve smaller, or raise "
                "CONDA_BUILD_TIMEOUT."
            ) from error
        return self._result(outcome or None, result.returncode, result.stderr_tail, spec)

    @staticmethod
    def _result(
        outcome: dict | None, returncode: int, stderr_tail: str, spec: EnvSpec
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
            if kind not in hints:
                raise PackageManagerError(
                    f"The embedded solver failed ({kind}): {message}\nThis is a bug in the "
                    "worker; please report it."
                )
            raise EnvironmentBuildError(
                f"Environment build failed ({kind}): {message}\n{hints[kind]}"
            )
        raise PackageManagerError(
            f"The embedded solver exited unexpectedly (code {returncode}):\n"
            + (stderr_tail or "no output")
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
    argv = [
        str(python),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--no-warn-script-location",
        *requirements,
    ]
    try:
        # pip writes its errors to stderr and its log to stdout: the stderr tail is what
        # explains a failure, without a limit on how long one of its lines may be.
        result = await run_child(argv, env=clean_env(prefix, pip_mirror=True), timeout=timeout)
    except ChildTimeout as error:
        raise EnvironmentBuildError(
            f"pip install took longer than {timeout:.0f} s and was stopped."
        ) from error
    except OSError as error:  # no python in the environment, argument list too long
        raise EnvironmentBuildError(f"pip could not be started in {prefix}: {error}") from error
    if result.returncode != 0:
        raise EnvironmentBuildError(
            f"pip install {' '.join(requirements)} failed (exit {result.returncode}). Check "
            "the manifest's pip requirements. pip said:\n" + result.stderr_tail
        )


def _package_root() -> str:
    """The folder holding ``hypha_conda_plugin``, so the child imports this very copy."""
    return str(Path(__file__).resolve().parents[2])
