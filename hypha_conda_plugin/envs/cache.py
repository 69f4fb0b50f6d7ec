"""On-disk environments keyed by spec, built once and reused.

An environment counts only once its ``ready`` marker exists, written after every build
step succeeded. A folder without it is a half-built leftover (a crash, a cancelled
build) and is deleted before building again, so a broken environment is never reused.
Builds of one key are serialized by an asyncio lock inside the process and by an
advisory file lock across processes that share the cache folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.envs.builders import Builder, install_pip_packages
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import EnvironmentBuildError

logger = logging.getLogger(__name__)

READY_MARKER = "conda-meta/hypha-conda-plugin-ready.json"


@dataclass(frozen=True)
class CachedEnv:
    """A ready environment: where it is and whether this request built it."""

    key: str
    prefix: Path
    reused: bool
    build_seconds: float = 0.0

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    async def release(self) -> None:
        """The session no longer uses the environment (leases come with eviction)."""


class EnvCache:
    def __init__(
        self,
        envs_dir: Path,
        builder: Builder,
        *,
        channel_alias: str | None,
        platform: str,
        pip_timeout: float,
        finish: Callable[[Path, Progress], Awaitable[None]] | None = None,
    ) -> None:
        """``finish`` completes a built environment before it is marked ready (bytecode)."""
        self.envs_dir = envs_dir
        self.builder = builder
        self.channel_alias = channel_alias
        self.platform = platform
        self.pip_timeout = pip_timeout
        self.finish = finish
        self._locks: dict[str, asyncio.Lock] = {}

    def key_for(self, spec: EnvSpec) -> str:
        return spec.cache_key(channel_alias=self.channel_alias, platform=self.platform)

    def prefix_for(self, key: str) -> Path:
        """The environment's folder. Keys are hex digests, so this is a plain child of
        ``envs_dir`` (already resolved by the settings); no file system call needed."""
        if not key.isalnum():
            raise EnvironmentBuildError(f"Refusing environment key {key!r}")
        return self.envs_dir / key

    async def acquire(self, spec: EnvSpec, progress: Progress) -> CachedEnv:
        """Return a ready environment for ``spec``, building it if needed."""
        key = self.key_for(spec)
        prefix = self.prefix_for(key)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock, self._file_lock(key):
            if await asyncio.to_thread(self._is_ready, prefix):
                await asyncio.to_thread(self._touch, prefix)
                await progress(
                    {
                        "type": "info",
                        "stage": "environment",
                        "message": f"Reusing cached environment {key}",
                    }
                )
                return CachedEnv(key=key, prefix=prefix, reused=True)
            return await self._build(spec, key, prefix, progress)

    async def _build(self, spec: EnvSpec, key: str, prefix: Path, progress: Progress) -> CachedEnv:
        if await asyncio.to_thread(prefix.exists):
            logger.warning("Removing half-built environment %s", prefix)
            await asyncio.to_thread(shutil.rmtree, prefix, True)
        await progress(
            {
                "type": "info",
                "stage": "environment",
                "message": f"Building environment {key} with {self.builder.name}: "
                + ", ".join(spec.conda),
            }
        )
        started = time.monotonic()
        try:
            result = await self.builder.build(spec, prefix, progress)
            await install_pip_packages(prefix, spec.pip, progress, self.pip_timeout)
            if self.finish is not None:
                await self.finish(prefix, progress)
            await asyncio.to_thread(self._mark_ready, prefix, spec, result.packages)
        except BaseException:
            # Failed or cancelled: leave nothing that could be mistaken for an environment.
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, prefix, True))
            raise
        seconds = time.monotonic() - started
        await progress(
            {
                "type": "success",
                "stage": "environment",
                "message": f"Environment {key} built in {seconds:.1f} s",
            }
        )
        return CachedEnv(key=key, prefix=prefix, reused=False, build_seconds=seconds)

    @contextlib.asynccontextmanager
    async def _file_lock(self, key: str) -> AsyncIterator[None]:
        await asyncio.to_thread(self.envs_dir.mkdir, parents=True, exist_ok=True)
        handle = await asyncio.to_thread(open, self.envs_dir / f".{key}.lock", "a+")
        try:
            await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @staticmethod
    def _is_ready(prefix: Path) -> bool:
        return (prefix / READY_MARKER).is_file() and (prefix / "bin" / "python").exists()

    @staticmethod
    def _touch(prefix: Path) -> None:
        (prefix / READY_MARKER).touch()

    @staticmethod
    def _mark_ready(prefix: Path, spec: EnvSpec, packages: tuple[str, ...]) -> None:
        marker = prefix / READY_MARKER
        payload = {"spec": spec.describe(), "packages": list(packages), "created": time.time()}
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(marker)
