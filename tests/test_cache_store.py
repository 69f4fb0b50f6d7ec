"""The cache folder's locks, removal, sweep and eviction policy, with real processes.

Environments here are small folders shaped like conda environments (``conda-meta``
records listing files, and our ready marker over them): the lock and sweep logic only
looks at those. Leases and builds of "other workers" are real child processes holding
the same file locks the worker takes, so a crash is a real ``kill -9``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypha_conda_plugin.envs.eviction import CacheLimits, EnvRecord, evict, sweep
from hypha_conda_plugin.envs.integrity import check, read_marker, write_marker
from hypha_conda_plugin.envs.locks import KeyedLocks
from hypha_conda_plugin.envs.store import CacheLayout, Removal, force_rmtree, tree_size

REPO = Path(__file__).resolve().parents[1]


def fake_env(layout: CacheLayout, key: str, *, files: int = 20) -> Path:
    """A folder with a conda-meta record of ``files`` files and a ready marker."""
    assert layout.prepare()
    prefix = layout.prefix(key)
    names = [f"lib/pkg/mod{i}.py" for i in range(files)]
    for name in names:
        (prefix / name).parent.mkdir(parents=True, exist_ok=True)
        (prefix / name).write_text(f"# {name}\n")
    (prefix / "conda-meta").mkdir(parents=True, exist_ok=True)
    (prefix / "conda-meta" / "pkg-1.0-0.json").write_text(json.dumps({"files": names}))
    write_marker(prefix, key, {"conda": [f"pkg-{key}"], "pip": [], "channels": ["c"]}, "test")
    return prefix


def set_last_used(layout: CacheLayout, key: str, when: float) -> None:
    path = layout.lease_path(key)
    path.touch()
    os.utime(path, (when, when))


class Holder:
    """Another process holding a lock file (shared or exclusive) until killed."""

    def __init__(self, path: Path, mode: str) -> None:
        code = (
            "import sys, time\n"
            "from pathlib import Path\n"
            "from hypha_conda_plugin.envs.locks import LockFile, SHARED, EXCLUSIVE\n"
            f"lock = LockFile.try_lock(Path({str(path)!r}), {mode})\n"
            "print('held' if lock else 'busy', flush=True)\n"
            "time.sleep(600)\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        assert self.process.stdout.readline().strip() == "held"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def layout(tmp_path: Path) -> CacheLayout:
    return CacheLayout(tmp_path / "envs")


def test_a_lease_in_another_process_blocks_removal_until_that_process_dies(layout):
    prefix = fake_env(layout, "aaaa")
    holder = Holder(layout.lease_path("aaaa"), "SHARED")
    try:
        assert layout.remove("aaaa") is Removal.IN_USE
        assert check(prefix, read_marker(prefix)) is None  # untouched
    finally:
        holder.kill()
    # A crash cannot leave a lease behind: the kernel released it with the process.
    assert layout.remove("aaaa") is Removal.REMOVED
    assert not prefix.exists()
    assert not layout.lease_path("aaaa").exists()
    assert not layout.build_path("aaaa").exists()
    assert list(layout.trash_dir.iterdir()) == []


def test_a_build_in_another_process_blocks_removal(layout):
    fake_env(layout, "bbbb")
    holder = Holder(layout.build_path("bbbb"), "EXCLUSIVE")
    try:
        assert layout.remove("bbbb") is Removal.BUILDING
    finally:
        holder.kill()
    assert layout.remove("bbbb") is Removal.REMOVED


def test_sweep_evicts_least_recently_used_but_never_what_is_leased(layout):
    now = time.time()
    for age, key in enumerate(["k1", "k2", "k3", "k4", "k5"]):
        fake_env(layout, key)
        set_last_used(layout, key, now - 1000 * (5 - age))  # k1 least recently used
    holder = Holder(layout.lease_path("k1"), "SHARED")
    try:
        report = sweep(layout, CacheLimits(max_envs=2))
    finally:
        holder.kill()
    # k1 is the least recently used but in use: it stays (and counts), the next least
    # recently used go in its place.
    assert [key for key, _ in report.removed] == ["k2", "k3", "k4"]
    assert all("CONDA_CACHE_MAX_ENVS" in why for _, why in report.removed)
    assert report.kept_in_use == ["k1"]
    assert layout.keys() == ["k1", "k5"]
    # Once its user is gone, it is an ordinary least recently used environment.
    report = sweep(layout, CacheLimits(max_envs=1))
    assert [key for key, _ in report.removed] == ["k1"]
    assert layout.keys() == ["k5"]


def test_sweep_removes_old_environments_unless_in_use(layout):
    fake_env(layout, "old1")
    fake_env(layout, "old2")
    holder = Holder(layout.lease_path("old2"), "SHARED")
    time.sleep(0.05)
    try:
        report = sweep(layout, CacheLimits(max_age=0.01))
    finally:
        holder.kill()
    assert [key for key, _ in report.removed] == ["old1"]
    assert "older than CONDA_CACHE_MAX_AGE_DAYS" in report.removed[0][1]
    assert layout.keys() == ["old2"]


def test_sweep_counts_size_against_the_size_limit(layout):
    now = time.time()
    for index, key in enumerate(["s1", "s2", "s3"]):
        fake_env(layout, key, files=50)
        set_last_used(layout, key, now - 100 * (3 - index))
    one_env = tree_size(layout.prefix("s3"))
    report = sweep(layout, CacheLimits(max_size=int(one_env * 1.5)))
    assert [key for key, _ in report.removed] == ["s1", "s2"]
    assert "CONDA_CACHE_MAX_SIZE" in report.removed[0][1]


def test_sweep_clears_half_built_environments_only_when_nobody_builds_them(layout):
    assert layout.prepare()
    half = layout.prefix("half")
    (half / "lib").mkdir(parents=True)
    (half / "lib" / "partial.so").write_bytes(b"\0" * 100)
    builder = Holder(layout.build_path("half"), "EXCLUSIVE")
    try:
        report = sweep(layout, CacheLimits())
        assert report.half_built == [] and half.exists()  # a live build: leave it
    finally:
        builder.kill()  # the build's process died (kill -9): its lock went with it
    report = sweep(layout, CacheLimits())
    assert report.half_built == ["half"]
    assert not half.exists()


def test_sweep_removes_stale_lock_files_but_not_held_ones(layout):
    fake_env(layout, "live")
    for key in ("gone1", "gone2"):
        layout.lease_path(key).touch()
        layout.build_path(key).touch()
    legacy = layout.legacy_lock("live")  # the previous version's lock file
    legacy.touch()
    holder = Holder(layout.lease_path("gone2"), "SHARED")
    try:
        sweep(layout, CacheLimits())
        names = sorted(p.name for p in layout.meta_dir.iterdir())
    finally:
        holder.kill()
    assert "gone1.lease" not in names and "gone1.build" not in names
    assert "gone2.lease" in names  # somebody holds it
    assert not legacy.exists()
    assert layout.keys() == ["live"]


def test_metadata_is_private(layout):
    fake_env(layout, "priv")
    layout.lease_path("priv").touch()
    from hypha_conda_plugin.envs.locks import SHARED, LockFile

    LockFile.try_lock(layout.build_path("priv2"), SHARED).release()
    assert layout.meta_dir.stat().st_mode & 0o777 == 0o700
    assert layout.trash_dir.stat().st_mode & 0o777 == 0o700
    assert layout.build_path("priv2").stat().st_mode & 0o777 == 0o600
    marker = layout.prefix("priv") / "conda-meta" / "hypha-conda-plugin-ready.json"
    assert marker.stat().st_mode & 0o777 == 0o600


def test_eviction_policy_order_and_reasons():
    now = 10_000.0

    def record(key: str, created: float, used: float, size: int = 1) -> EnvRecord:
        return EnvRecord(key, created, used, (0, 0, 0), {"conda": [key]}, size)

    records = [
        record("a", now - 50, now - 40),
        record("b", now - 5000, now - 1),  # old: goes by age though recently used
        record("c", now - 60, now - 30),
        record("d", now - 70, now - 20),
    ]
    busy = {"a"}
    tried: list[str] = []

    def remove(r: EnvRecord) -> Removal:
        tried.append(r.key)
        return Removal.IN_USE if r.key in busy else Removal.REMOVED

    removed, kept, reclaim = evict(records, CacheLimits(max_envs=2, max_age=1000), now, remove)
    assert [(r.key, why.split(",")[0].split(";")[0]) for r, why in removed] == [
        ("b", "built 1.4 h ago"),
        ("c", "least recently used"),
    ]
    assert [r.key for r in kept] == ["a"]
    assert reclaim == []
    assert tried == ["b", "a", "c"]

    # Held only by this worker's warm kernels or bytecode pass, "a" keeps its turn: it is
    # to be given back and removed, and "c", more recently used, stays.
    tried.clear()
    removed, kept, reclaim = evict(
        records, CacheLimits(max_envs=2, max_age=1000), now, remove, reclaimable={"a"}
    )
    assert [r.key for r, _ in removed] == ["b"]
    assert [r.key for r in reclaim] == ["a"]
    assert kept == []
    assert tried == ["b", "a"]


def test_keyed_locks_forget_keys_nobody_holds():
    import asyncio

    async def scenario() -> int:
        locks = KeyedLocks()

        async def use(key: str) -> None:
            async with locks.hold(key):
                await asyncio.sleep(0.01)

        await asyncio.gather(*(use(f"key{i % 50}") for i in range(500)))
        return len(locks)

    assert asyncio.run(scenario()) == 0


def _sealed_tree(root: Path) -> Path:
    env = root / "sealed-env"
    for name in ("lib/python3.11/site-packages/pkg/__init__.py", "bin/tool", "share/x/y.txt"):
        (env / name).parent.mkdir(parents=True, exist_ok=True)
        (env / name).write_text("x")
    for folder, _, files in os.walk(env, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
    return env


def test_a_sealed_read_only_environment_is_deleted_by_its_owner(tmp_path):
    """As root every permission check passes, so the deletion runs as an unprivileged
    owner (uid 65534) in a child process when the suite runs as root."""
    shared = Path(f"/tmp/hcp-sealed-{os.getpid()}")
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    try:
        env = _sealed_tree(shared)
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        if os.geteuid() == 0:
            for folder, dirs, files in os.walk(env):
                for name in [*dirs, *files]:
                    os.lchown(os.path.join(folder, name), uid, uid)
            os.lchown(env, uid, uid)
        code = (  # imports first: the interpreter's own files may be root's only
            "import os, pathlib, shutil, sys\n"
            "from hypha_conda_plugin.envs.store import force_rmtree\n"
            f"if os.geteuid() == 0: os.setgid({uid}); os.setuid({uid})\n"
            f"env = {str(env)!r}\n"
            "try:\n"
            "    shutil.rmtree(env)\n"
            "    print('plain rmtree worked')\n"
            "except PermissionError:\n"
            "    force_rmtree(pathlib.Path(env))\n"
            "    print('gone' if not os.path.exists(env) else 'still there')\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )
        assert done.stdout.strip() == "gone", done.stderr
    finally:
        for folder, _, _ in os.walk(shared):
            os.chmod(folder, 0o755)
        shutil.rmtree(shared, ignore_errors=True)


def test_force_rmtree_tolerates_a_tree_that_vanishes_meanwhile(tmp_path):
    env = tmp_path / "env"
    (env / "a").mkdir(parents=True)
    (env / "a" / "f").write_text("x")
    force_rmtree(env)
    force_rmtree(env)  # already gone: another process finished it
    assert not env.exists()
