"""Environment cache: what a start pays on a hit, and what a build costs over raw rattler.

Measured in one run, medians over ``--runs``, with the worker's ``EnvCache`` used
directly (no Hypha in between) on the offline channel:

* hit: ``EnvCache.acquire`` of a ready environment (lease, validation, last-use update)
  and the validation alone, for the largest environment the channel can make; plus the
  first hit in a process, which also checks once that the environment's python starts.
* build: a cold build (empty environment and package caches) and one with a warm
  package cache, each against raw py-rattler ``solve`` + ``install`` of the same specs
  into an empty prefix, timed around those two calls only (in a child process, as
  py-rattler can crash while the interpreter exits). The goal is our build at most 1.2x
  raw: the difference is our child process start, the marker and fingerprint, locks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from tables import print_table  # noqa: E402

from hypha_conda_plugin.channel import build_channel  # noqa: E402
from hypha_conda_plugin.envs.integrity import check, read_marker, write_marker  # noqa: E402
from hypha_conda_plugin.envs.spec import EnvSpec, resolve_channel  # noqa: E402
from hypha_conda_plugin.settings import Settings  # noqa: E402
from hypha_conda_plugin.worker import CondaWorker  # noqa: E402

PACKAGES = ["numpy", "pandas"]
# The largest environment the offline channel makes: an app's (hypha-rpc) with both.
BIG = EnvSpec.from_manifest({"dependencies": ["python", *PACKAGES]}, for_app=True)
BUILD = EnvSpec.from_manifest({"dependencies": ["python", *PACKAGES]})

RAW = """
import asyncio, json, os, sys, time
import rattler
from rattler import Channel, ChannelConfig, Gateway, VirtualPackage

job = json.loads(sys.argv[1])

async def main():
    config = ChannelConfig(channel_alias=job["alias"])
    channels = [Channel(c, config) for c in job["channels"]]
    platform = rattler.Platform.current()
    started = time.perf_counter()
    records = await rattler.solve(
        sources=channels, specs=job["specs"], gateway=Gateway(cache_dir=job["repodata"]),
        platforms=[platform, rattler.Platform("noarch")],
        virtual_packages=VirtualPackage.detect(),
    )
    await rattler.install(records, target_prefix=job["prefix"], cache_dir=job["pkgs"],
                          show_progress=False)
    return time.perf_counter() - started

seconds = asyncio.run(main())
print(json.dumps({"seconds": seconds, "packages": len(os.listdir(job["prefix"] + "/conda-meta"))}))
sys.stdout.flush()
os._exit(0)
"""


async def quiet(_: dict) -> None:
    return None


def worker_for(root: Path, alias: str) -> CondaWorker:
    return CondaWorker(
        Settings(cache_dir=root / "cache", working_dir=root / "sessions", channel_alias=alias)
    )


def raw_install(root: Path, alias: str, pkgs: Path, spec: EnvSpec = BUILD) -> float:
    """Raw py-rattler solve + install of ``spec`` into ``root/raw-env``, in a child;
    returns the seconds of those two calls alone."""
    prefix = root / "raw-env"
    shutil.rmtree(prefix, ignore_errors=True)
    job = {
        "alias": alias,
        "channels": list(spec.channels),
        "specs": list(spec.conda),
        "prefix": str(prefix),
        "pkgs": str(pkgs),
        "repodata": str(root / "raw-repodata"),
    }
    done = subprocess.run(
        [sys.executable, "-c", RAW, json.dumps(job)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])["seconds"]


async def build_rows(alias: str, runs: int) -> tuple[list, list]:
    cold, raw_cold, warm, raw_warm = [], [], [], []
    keep = Path(tempfile.mkdtemp())
    root_env = keep / "env"
    for run in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            # Alternate who goes first, so neither side always meets a cold page cache.
            if run % 2 == 0:
                await raw_pair(root, alias, raw_cold, raw_warm)
            await ours_pair(root, alias, cold, warm, root_env if run == 0 else None)
            if run % 2 == 1:
                await raw_pair(root, alias, raw_cold, raw_warm)
    med = statistics.median
    child = med([await asyncio.to_thread(child_start) for _ in range(runs)])
    marker = med([await asyncio.to_thread(fingerprint, root_env) for _ in range(runs)])
    shutil.rmtree(keep, ignore_errors=True)
    parts = [
        ("  of which: build child start (python + import rattler)", child, None),
        ("  of which: ready marker with fingerprint", marker, None),
    ]
    return (
        [
            ("raw py-rattler solve + install (baseline)", med(raw_cold), 1.0),
            ("EnvCache.acquire, new environment", med(cold), med(cold) / med(raw_cold)),
            *parts,
        ],
        [
            ("raw py-rattler solve + install (baseline)", med(raw_warm), 1.0),
            ("EnvCache.acquire, new environment", med(warm), med(warm) / med(raw_warm)),
            *parts,
        ],
    )


async def raw_pair(root: Path, alias: str, cold: list, warm: list) -> None:
    cold.append(await asyncio.to_thread(raw_install, root, alias, root / "raw-pkgs"))
    warm.append(await asyncio.to_thread(raw_install, root, alias, root / "raw-pkgs"))


async def ours_pair(root: Path, alias: str, cold: list, warm: list, keep: Path | None) -> None:
    cache = worker_for(root, alias).envs
    started = time.perf_counter()
    lease = await cache.acquire(BUILD, quiet)
    cold.append(time.perf_counter() - started)
    await lease.release()
    await cache.close()
    shutil.rmtree(root / "cache" / "envs")  # keep the package cache
    cache = worker_for(root, alias).envs
    started = time.perf_counter()
    lease = await cache.acquire(BUILD, quiet)
    warm.append(time.perf_counter() - started)
    await lease.release()
    await cache.close()
    if keep is not None:  # an environment to time the fingerprint on, after the runs
        shutil.copytree(lease.prefix, keep, symlinks=True)


def child_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import rattler"], check=True)
    return time.perf_counter() - started


def fingerprint(prefix: Path) -> float:
    started = time.perf_counter()
    write_marker(prefix, prefix.name, BUILD.describe(), "bench")
    return time.perf_counter() - started


async def hit_rows(alias: str, runs: int, hits: int) -> tuple[list, int]:
    first, hit, validate = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = worker_for(root, alias).envs
        lease = await cache.acquire(BIG, quiet)
        await lease.release()
        prefix = lease.prefix
        marker = read_marker(prefix)
        packages = len(marker["conda"])
        for _ in range(runs):
            fresh = worker_for(root, alias).envs  # a new process would start like this
            started = time.perf_counter()
            lease = await fresh.acquire(BIG, quiet)
            first.append(time.perf_counter() - started)
            await lease.release()
            await fresh.close()
        for _ in range(hits):
            started = time.perf_counter()
            lease = await cache.acquire(BIG, quiet)
            hit.append(time.perf_counter() - started)
            await lease.release()
            started = time.perf_counter()
            assert check(prefix, marker) is None
            validate.append(time.perf_counter() - started)
        await cache.close()
    med = statistics.median
    return [
        (f"validation alone ({packages} packages)", med(validate), None),
        ("cache hit: acquire with validation", med(hit), None),
        ("first hit in a process (python starts, once)", med(first), None),
    ], packages


def ms(rows: list) -> list:
    return [(label, seconds * 1000, ratio) for label, seconds, ratio in rows]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hits", type=int, default=200)
    args = parser.parse_args()
    channel = build_channel(REPO / ".cache" / "offline-channel", PACKAGES, log=lambda _: None)
    alias = channel.alias_url
    print(f"{args.runs} runs, {args.hits} hits; python {sys.version.split()[0]}")
    print(f"build spec: {', '.join(BUILD.conda)} from {resolve_channel('conda-forge', alias)}")
    rows, packages = await hit_rows(alias, args.runs, args.hits)
    print_table(f"Cache hit ({', '.join(BIG.conda)}: {packages} packages)", ms(rows), "ms")
    cold, warm = await build_rows(alias, args.runs)
    print_table("Build, empty package cache", ms(cold), "ms")
    print_table("Build, warm package cache", ms(warm), "ms")


if __name__ == "__main__":
    asyncio.run(main())
