"""Child-process entry point that solves and installs one environment with py-rattler.

Run as ``python -m hypha_conda_plugin.envs.rattler_child`` with a JSON job on stdin. It
prints JSON lines (``progress``, then ``done`` or ``error``) and ends with ``os._exit``:
py-rattler 0.28 can crash while the interpreter shuts down, and a build must never take
the Hypha server down with it, so the parent only ever sees this process's lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from typing import Any

DEFAULT_ALIAS = "https://conda.anaconda.org/"


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class ProgressReporter:
    """Turns rattler's install callbacks into coarse progress lines for the user."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def on_transaction_start(self, total_operations: int) -> None:
        self.total = total_operations
        emit(
            "progress",
            stage="install",
            message=f"Installing {total_operations} packages",
            progress=0.0,
        )

    def on_download_start(self, cache_entry: int) -> int:
        return cache_entry

    def on_link_start(self, operation: int, package_name: str) -> int:
        return operation

    def on_transaction_operation_complete(self, operation: int) -> None:
        self.done += 1
        # A line every ~10% keeps callbacks cheap for big environments.
        step = max(1, self.total // 10)
        if self.done % step == 0 or self.done == self.total:
            emit(
                "progress",
                stage="install",
                message=f"Installed {self.done}/{self.total}",
                progress=self.done / max(1, self.total),
            )

    def __getattr__(self, name: str) -> Any:
        # Every other hook of rattler's InstallerReporter protocol: accept and ignore.
        if name.startswith("on_"):
            return lambda *args, **kwargs: 0
        raise AttributeError(name)


async def build(job: dict[str, Any]) -> list[str]:
    import rattler
    from rattler import Channel, ChannelConfig, Gateway, MatchSpec, VirtualPackage

    try:
        specs = [MatchSpec(spec) for spec in job["specs"]]
    except Exception as error:  # rattler raises its own parse error types
        raise BuildFailure("spec", f"Invalid package spec: {error}") from error

    config = ChannelConfig(channel_alias=job.get("channel_alias") or DEFAULT_ALIAS)
    try:
        channels = [Channel(name, config) for name in job["channels"]]
    except Exception as error:
        raise BuildFailure("channel", f"Invalid channel: {error}") from error

    platform = rattler.Platform.current()
    emit("progress", stage="solve", message="Solving environment", progress=0.0)
    gateway = Gateway(cache_dir=job["repodata_cache_dir"])
    try:
        records = await rattler.solve(
            sources=channels,
            specs=specs,
            gateway=gateway,
            platforms=[platform, rattler.Platform("noarch")],
            virtual_packages=VirtualPackage.detect(),
        )
    except Exception as error:
        raise BuildFailure("solve", str(error)) from error
    emit("progress", stage="solve", message=f"Solved: {len(records)} packages", progress=1.0)

    try:
        await rattler.install(
            records,
            target_prefix=job["prefix"],
            cache_dir=job["pkgs_dir"],
            show_progress=False,
            reporter=ProgressReporter(),
        )
    except Exception as error:
        raise BuildFailure("install", str(error)) from error
    return sorted(f"{r.name.normalized}={r.version}={r.build}" for r in records)


class BuildFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def main() -> None:
    code = 0
    try:
        job = json.loads(sys.stdin.read())
        packages = asyncio.run(build(job))
        emit("done", packages=packages)
    except BuildFailure as failure:
        emit("error", kind=failure.kind, message=str(failure))
        code = 1
    except BaseException as error:
        emit(
            "error",
            kind="internal",
            message=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(),
        )
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
