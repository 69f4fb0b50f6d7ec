"""Session life cycle timings and event-loop health of the worker.

Measured in one process, with the worker used directly (no Hypha in between) so the
numbers are the worker's own:

* environment: cold build (empty cache), build with a warm package cache, reuse;
  baseline ``uv pip install`` of the same Python packages into a new virtualenv.
* kernel: start, trivial execute, shutdown; baseline: the same cell through a bare
  jupyter_client kernel with no worker layer.
* event loop: the worst delay of a 10 ms ticker while idle (baseline) and while a cold
  build and kernel start run. The plugin lives in the Hypha server's loop, so this must
  stay near the idle figure.
"""

from __future__ import annotations

import argparse
import asyncio
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

from measure import (  # noqa: E402
    bare_execute,
    in_process_worker,
    quiet,
    start_bare_kernel,
    stop_bare_kernel,
    timed,
)
from tables import print_table  # noqa: E402

from hypha_conda_plugin.channel import build_channel  # noqa: E402

PACKAGES = ["numpy", "pandas"]
MANIFEST = {"dependencies": ["python", *PACKAGES]}
#: The worker serves callers Hypha names; in-process calls say who they act for.
CTX = {"ws": "bench", "user": {"id": "bench-user"}}


class LagProbe:
    """Worst and median delay of a task that wants to wake every ``period`` seconds."""

    def __init__(self, period: float = 0.01) -> None:
        self.period = period
        self.delays: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.period)
            self.delays.append(time.perf_counter() - before - self.period)

    def __enter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def environment_rows(alias: str, runs: int, wheels: Path) -> list[tuple]:
    from hypha_conda_plugin.envs.spec import EnvSpec

    spec = EnvSpec.from_manifest(MANIFEST)
    cold, warm_pkgs, reuse, uv = [], [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            cache = in_process_worker(root, alias).envs
            cold.append(await timed(lambda c=cache: c.acquire(spec, quiet)))
            reuse.append(await timed(lambda c=cache: c.acquire(spec, quiet)))
            shutil.rmtree(root / "cache" / "envs")  # keep the package cache
            cache = in_process_worker(root, alias).envs
            warm_pkgs.append(await timed(lambda c=cache: c.acquire(spec, quiet)))
            uv.append(await timed(lambda r=root: uv_install(r / "venv", wheels)))
    base = statistics.median(uv)
    return [
        ("uv venv + pip install (baseline)", base, 1.0),
        ("conda env, cold (empty caches)", statistics.median(cold), statistics.median(cold) / base),
        (
            "conda env, warm package cache",
            statistics.median(warm_pkgs),
            statistics.median(warm_pkgs) / base,
        ),
        ("conda env, reused from cache", statistics.median(reuse), statistics.median(reuse) / base),
    ]


async def uv_install(venv: Path, wheels: Path) -> None:
    def run() -> None:
        subprocess.run([sys.executable, "-m", "uv", "venv", "-q", str(venv)], check=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "uv",
                "pip",
                "install",
                "-q",
                "--offline",
                "--no-index",
                "--find-links",
                str(wheels),
                "--python",
                str(venv / "bin" / "python"),
                "ipykernel",
                *PACKAGES,
            ],
            check=True,
        )

    await asyncio.to_thread(run)


async def kernel_rows(alias: str, runs: int, executes: int) -> list[tuple]:
    with tempfile.TemporaryDirectory() as tmp:
        worker = in_process_worker(Path(tmp), alias)
        start, execute, stop = [], [], []
        for run in range(runs):
            sid = f"bench-{run}"
            start.append(
                await timed(
                    lambda sid=sid: worker.start({"id": sid, "manifest": MANIFEST}, context=CTX)
                )
            )
            for _ in range(executes):
                execute.append(
                    await timed(lambda sid=sid: worker.execute(sid, "1 + 1", context=CTX))
                )
            stop.append(await timed(lambda sid=sid: worker.stop(sid, context=CTX)))
        await worker.close()

        # Baseline: the same cell through a bare jupyter_client kernel of the same env.
        envs = (Path(tmp) / "cache" / "envs").iterdir()
        python = next(p for p in envs if p.is_dir()) / "bin" / "python"
        km, kc = await start_bare_kernel(python, Path(tmp))
        raw = [await timed(lambda: bare_execute(kc, timeout=30)) for _ in range(executes)]
        await stop_bare_kernel(km, kc)
    base = statistics.median(raw)
    med = statistics.median
    return [
        ("execute '1 + 1', bare jupyter_client (baseline)", base, 1.0),
        ("execute '1 + 1' through the worker", med(execute), med(execute) / base),
        ("start session (env reused, kernel start)", med(start), med(start) / base),
        ("stop session", med(stop), med(stop) / base),
    ]


async def loop_rows(alias: str) -> list[tuple]:
    with LagProbe() as idle:
        await asyncio.sleep(2)
    with tempfile.TemporaryDirectory() as tmp:
        worker = in_process_worker(Path(tmp), alias)
        with LagProbe() as busy:
            await worker.start({"id": "lag", "manifest": MANIFEST}, context=CTX)
            await worker.execute("lag", "sum(range(10**6))", context=CTX)
            await worker.stop("lag", context=CTX)
        await worker.close()
    rows = []
    for label, probe in (
        ("idle loop (baseline)", idle),
        ("during cold build + kernel start + stop", busy),
    ):
        rows.append((f"{label}: median delay", statistics.median(probe.delays), None))
        rows.append((f"{label}: worst delay", max(probe.delays), None))
    return rows


def print_table_ms(title: str, rows: list[tuple]) -> None:
    print_table(title, [(label, seconds * 1000, ratio) for label, seconds, ratio in rows], "ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--executes", type=int, default=30)
    args = parser.parse_args()

    channel = build_channel(REPO / ".cache" / "offline-channel", PACKAGES, log=lambda _: None)
    wheels = REPO / ".cache" / "bench-wheels"
    if not wheels.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "-d",
                str(wheels),
                "ipykernel",
                *PACKAGES,
            ],
            check=True,
        )
    print(f"{args.runs} runs; python {sys.version.split()[0]}; channel {channel.root}")
    print_table_ms(
        "Environment (python, numpy, pandas, ipykernel)",
        await environment_rows(channel.alias_url, args.runs, wheels),
    )
    print_table_ms("Kernel", await kernel_rows(channel.alias_url, args.runs, args.executes))
    print_table_ms("Event loop (10 ms ticker)", await loop_rows(channel.alias_url))


if __name__ == "__main__":
    asyncio.run(main())
