"""``EnvCache`` used directly, with real builds from the offline channel: credentials,
concurrent acquires, failed builds, warm leases and the python check.

The end-to-end behaviour (eviction, sharing, read-only caches, crashes) is in
``test_env_cache.py``; these are the parts a server would only show indirectly.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from hypha_conda_plugin.envs.cache import EnvCache
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import EnvironmentBuildError
from hypha_conda_plugin.settings import Settings
from hypha_conda_plugin.worker import CondaWorker

TOKEN = "tk-5ecret-0f-the-channel"


class Messages:
    def __init__(self) -> None:
        self.items: list[dict] = []

    async def __call__(self, message: dict) -> None:
        self.items.append(message)

    def text(self) -> str:
        return "\n".join(m.get("message", "") for m in self.items)


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Path:
    """One package cache for the module, so each test's builds do not unpack it again."""
    return tmp_path_factory.mktemp("pkgs")


def cache_in(root: Path, alias: str | None, packages: Path, **settings) -> EnvCache:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cache").mkdir(exist_ok=True)
    if not (root / "cache" / "pkgs").exists():
        (root / "cache" / "pkgs").symlink_to(packages, target_is_directory=True)
    config = Settings(
        cache_dir=root / "cache", working_dir=root / "work", channel_alias=alias, **settings
    )
    return CondaWorker(config).envs


def spec(*packages: str, channels: tuple[str, ...] = ("conda-forge",)) -> EnvSpec:
    return EnvSpec.from_manifest({"dependencies": ["python", *packages], "channels": channels})


async def test_credentials_stay_out_of_the_cache_logs_and_messages(
    offline_channel, tmp_path, packages, caplog
):
    # The offline channel reached through a path shaped like conda's token URLs.
    tokened = tmp_path / "t" / TOKEN
    tokened.mkdir(parents=True)
    (tokened / "conda-forge").symlink_to(offline_channel.root / "conda-forge")
    channel = f"file://{tmp_path}/t/{TOKEN}/conda-forge"
    cache = cache_in(tmp_path / "c", None, packages)
    caplog.set_level(logging.DEBUG, logger="hypha_conda_plugin")
    log = Messages()
    try:
        lease = await cache.acquire(spec(channels=(channel,)), log)
        await lease.release()
        with pytest.raises(EnvironmentBuildError) as failure:
            await cache.acquire(spec("no-such-package", channels=(channel,)), log)
    finally:
        await cache.close()
    assert "no-such-package" in str(failure.value) and "/t/***/" in str(failure.value)
    assert TOKEN not in str(failure.value)
    assert "Building environment" in log.text() and TOKEN not in log.text()
    assert TOKEN not in caplog.text
    meta = [*(lease.prefix / "conda-meta").iterdir(), *cache.layout.meta_dir.iterdir()]
    assert len(meta) > 10
    for path in meta:
        assert TOKEN.encode() not in path.read_bytes(), path
        assert TOKEN not in path.name
    assert TOKEN not in lease.key


async def test_concurrent_acquires_build_once_and_keep_no_lock_for_later(
    offline_channel, tmp_path, packages
):
    cache = cache_in(tmp_path, offline_channel.alias_url, packages)
    try:
        leases = await asyncio.gather(*(cache.acquire(spec("munch"), Messages()) for _ in range(5)))
        assert [lease.reused for lease in leases].count(False) == 1
        assert len({lease.key for lease in leases}) == 1
        assert cache.leases_held() == {leases[0].key: 5}
        for lease in leases:
            await lease.release()
            await lease.release()  # idempotent
        assert cache.leases_held() == {}
        assert len(cache._locks) == 0  # the per-key locks went with their last user
    finally:
        await cache.close()


async def test_a_failed_or_cancelled_build_leaves_nothing(offline_channel, tmp_path, packages):
    cache = cache_in(tmp_path, offline_channel.alias_url, packages)
    building = asyncio.Event()

    async def on_progress(message: dict) -> None:
        if message.get("stage", "").startswith("build:install"):
            building.set()

    try:
        with pytest.raises(EnvironmentBuildError, match="no-such-package"):
            await cache.acquire(spec("no-such-package"), Messages())
        task = asyncio.create_task(cache.acquire(spec("pandas"), on_progress))
        await asyncio.wait_for(building.wait(), 120)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await cache.close()
    envs = cache.layout.envs_dir
    assert sorted(p.name for p in envs.iterdir()) == [".meta", ".trash"]
    assert [p.name for p in cache.layout.meta_dir.iterdir() if p.name != "sweep.lock"] == []
    assert list(cache.layout.trash_dir.iterdir()) == []


async def test_a_warm_lease_is_no_use_and_is_asked_to_let_go(offline_channel, tmp_path, packages):
    cache = cache_in(tmp_path, offline_channel.alias_url, packages, cache_max_envs=1)
    released = asyncio.Event()
    try:
        first = await cache.acquire(spec(), Messages())
        await first.release()
        lease_file = cache.layout.lease_path(first.key)
        os.utime(lease_file, (1_000_000, 1_000_000))  # last used long ago
        warm = await cache.acquire(spec(), Messages(), touch=False)
        assert lease_file.stat().st_mtime == 1_000_000  # holding it warm is not a use

        async def reclaim(key: str) -> None:
            assert key == warm.key
            await warm.release()
            released.set()

        cache.on_reclaim = reclaim
        newer = await cache.acquire(spec("tzdata"), Messages())
        await asyncio.wait_for(released.wait(), 60)
        for _ in range(300):  # the sweep after the reclaim removes it
            if not warm.prefix.exists():
                break
            await asyncio.sleep(0.1)
        assert not warm.prefix.exists()
        assert newer.prefix.exists()
        await newer.release()
    finally:
        await cache.close()


async def test_an_environment_whose_python_no_longer_starts_is_rebuilt(
    offline_channel, tmp_path, packages
):
    cache = cache_in(tmp_path, offline_channel.alias_url, packages)
    lease = await cache.acquire(spec(), Messages())
    await lease.release()
    await cache.close()
    # Same size, same name, broken contents: only running it tells. A new file, so the
    # package cache the environment's files are hard-linked from stays intact.
    binary = lease.python.resolve()
    broken = binary.with_name("broken")
    broken.write_bytes(b"\0" * binary.stat().st_size)
    broken.chmod(0o755)
    os.replace(broken, binary)

    fresh = cache_in(tmp_path, offline_channel.alias_url, packages)  # a new process's view
    log = Messages()
    try:
        again = await fresh.acquire(spec(), log)
        assert "its python does not start" in log.text()
        assert not again.reused and again.key == lease.key
        process = await asyncio.create_subprocess_exec(str(again.python), "-c", "pass")
        assert await process.wait() == 0
        await again.release()
    finally:
        await fresh.close()
