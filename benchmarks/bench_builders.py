"""Build time of one environment by conda and by the embedded solver, in one run.

The spec is python + numpy + ipykernel from the offline channel (the worker adds
nothing else: no pip item). Each builder runs through the worker's own Builder classes,
so the figures include what the worker adds (spec file, child process, result check):

* cold: an empty package cache (and repodata cache) for every build;
* warm: a package cache that an earlier build of the same spec filled.

A last row runs ``conda create`` by hand with the same flags and a warm cache, to show
how much of conda's time is the worker's (spec file, output parsing, checks) and how
much conda's own.

Medians of ``--runs`` builds; each row's ratio is against the embedded solver's row of
the same cache state, measured in the same run. The conda is the real conda 26.7.1 the
tests use (tests/conda_tool.py), with conda-rattler-solver as its solver.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from tables import print_table  # noqa: E402

from hypha_conda_plugin.channel import build_channel  # noqa: E402
from hypha_conda_plugin.childenv import package_manager_env  # noqa: E402
from hypha_conda_plugin.envs.builders import Builder, RattlerBuilder  # noqa: E402
from hypha_conda_plugin.envs.cli_builder import CliBuilder  # noqa: E402
from hypha_conda_plugin.envs.selection import select_package_manager  # noqa: E402
from hypha_conda_plugin.envs.spec import EnvSpec  # noqa: E402
from hypha_conda_plugin.settings import Settings  # noqa: E402
from tests.conda_tool import RealConda, conda_home, find_real_conda, tool_folder  # noqa: E402
from tests.conftest import CACHE, CHANNEL_REQUIREMENTS  # noqa: E402

SPEC = EnvSpec.from_manifest({"dependencies": ["python", "numpy", "ipykernel"]})


async def quiet(_: dict) -> None:
    return None


def rattler_builder(alias: str) -> Callable[[Path], Builder]:
    def make(cache: Path) -> Builder:
        return RattlerBuilder(
            pkgs_dir=cache / "pkgs",
            repodata_cache_dir=cache / "repodata",
            channel_alias=alias,
            timeout=1800,
        )

    return make


def real_conda() -> RealConda:
    conda = find_real_conda()
    if isinstance(conda, str):
        raise SystemExit(f"Cannot measure conda: {conda}")
    if conda.install_seconds is not None:
        print(f"Installed the test conda in {conda.install_seconds:.1f} s (cold).")
    return conda


def conda_builder(conda: RealConda, alias: str, root: Path) -> Callable[[Path], Builder]:
    tools = tool_folder(root, conda)
    tool = select_package_manager(Settings(working_dir=root, tool_search_path=str(tools))).tools[0]

    def make(cache: Path) -> Builder:
        # The package cache is conda's own (its condarc), one per cache folder here.
        home = conda_home(cache / "conda", conda, pkgs_dir=cache / "pkgs")
        env = package_manager_env(tools, host=home)
        return CliBuilder(tool, channel_alias=alias, timeout=1800, env=env)

    return make


async def timed_build(make: Callable[[Path], Builder], cache: Path, prefix: Path) -> float:
    builder = make(cache)
    started = time.perf_counter()
    await builder.build(SPEC, prefix, quiet)
    seconds = time.perf_counter() - started
    await asyncio.to_thread(shutil.rmtree, prefix, True)
    return seconds


async def measure(make: Callable[[Path], Builder], root: Path, runs: int) -> tuple[float, float]:
    """(median cold, median warm) seconds."""
    cold = []
    for run in range(runs):
        cache = root / f"cold-{run}"
        cold.append(await timed_build(make, cache, root / "envs" / f"cold-{run}"))
        await asyncio.to_thread(shutil.rmtree, cache, True)
    warm_cache = root / "warm"
    await timed_build(make, warm_cache, root / "envs" / "fill")  # fills the package cache
    warm = [
        await timed_build(make, warm_cache, root / "envs" / f"warm-{run}") for run in range(runs)
    ]
    return statistics.median(cold), statistics.median(warm)


async def bare_conda(conda: RealConda, alias: str, root: Path, runs: int) -> float:
    """Median seconds of ``conda create`` run directly, warm package cache."""
    home = conda_home(root / "conda", conda, pkgs_dir=root / "pkgs")
    env = package_manager_env(root, host=home)
    times = []
    for run in range(runs + 1):  # the first run fills the package cache
        prefix = root / "envs" / f"bare-{run}"
        argv = [
            *conda.command,
            "create",
            "--prefix",
            str(prefix),
            "--override-channels",
            "-c",
            alias.rstrip("/") + "/conda-forge",
            "--yes",
            "--json",
            *SPEC.conda,
        ]
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        if await process.wait() != 0 or not os.path.exists(prefix / "bin" / "python"):
            raise SystemExit(f"conda create failed: {argv}")
        if run:
            times.append(time.perf_counter() - started)
        await asyncio.to_thread(shutil.rmtree, prefix, True)
    return statistics.median(times)


async def main(runs: int) -> None:
    channel = build_channel(CACHE / "offline-channel", CHANNEL_REQUIREMENTS)
    with tempfile.TemporaryDirectory(prefix="bench-builders-") as tmp:
        root = Path(tmp)
        rattler = await measure(rattler_builder(channel.alias_url), root / "rattler", runs)
        tool = real_conda()
        make_conda = conda_builder(tool, channel.alias_url, root / "c")
        conda = await measure(make_conda, root / "conda", runs)
        bare = await bare_conda(tool, channel.alias_url, root / "bare", runs)
    rows = [
        ("embedded solver (py-rattler), cold package cache", rattler[0], 1.0),
        ("conda 26.7.1, cold package cache", conda[0], conda[0] / rattler[0]),
        ("embedded solver (py-rattler), warm package cache", rattler[1], 1.0),
        ("conda 26.7.1, warm package cache", conda[1], conda[1] / rattler[1]),
        ("conda create by hand (no worker), warm package cache", bare, bare / rattler[1]),
    ]
    print_table(
        f"Build of python + numpy + ipykernel, median of {runs} (ratio: against the "
        "embedded solver with the same cache state)",
        rows,
        "seconds",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    asyncio.run(main(parser.parse_args().runs))
