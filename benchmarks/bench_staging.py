"""files_to_stage through a real Hypha server: one request per file against zips.

Starts a local Hypha server (artifact manager on moto S3), installs an app through the
app controller and puts 1,100 small files and one 100 MB file into its artifact (written
straight into the artifact's S3 folder: uploading 1,100 files through ``put_file`` takes
many minutes on this server, and reading them, which is what is measured, is the same).
Then stages them with ``stage_files`` from this process, as the worker does, in each
mode, several times, and prints medians:

* many small files: one request per file (baseline) against zip batches;
* one 100 MB file: one request (baseline), what the worker does (the same: the file is
  over the zip member limit), and a forced zip (why there is such a limit);
* for each, the Hypha server's RSS growth during staging, the worst round trip of a
  websocket ``echo`` ticker (every 20 ms) and of an HTTP health check ticker against the
  server, and the worst lag of this process's event loop (where the worker's own work
  runs; inside a server this is the server's loop). The idle rows are the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_rpc import rss_mb, server_pid  # noqa: E402
from bench_sessions import LagProbe  # noqa: E402
from tables import print_table  # noqa: E402

from hypha_conda_plugin.app_files import AppFiles  # noqa: E402
from hypha_conda_plugin.local_server import LocalServer  # noqa: E402
from hypha_conda_plugin.stage_rules import parse_stage_rules  # noqa: E402
from hypha_conda_plugin.staging import stage_files  # noqa: E402
from hypha_conda_plugin.staging_limits import StagingLimits  # noqa: E402

WORKSPACE = "bench-ws"
APP_ID = "bench-staging"
MARKER = "marker-bench-staging.txt"


async def quiet(_: dict) -> None:
    return None


class Watch:
    """While staging runs: the server's RSS, echo and health round trips, our loop lag."""

    def __init__(self, api, server: LocalServer, pid: int) -> None:
        self.api, self.server, self.pid = api, server, pid
        self.echo: list[float] = []
        self.health: list[float] = []
        self.rss: list[float] = []
        self.tasks: list[asyncio.Task] = []

    async def _echo(self) -> None:
        while True:
            started = time.perf_counter()
            await self.api.echo("tick")
            self.echo.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)

    async def _health(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while True:
                started = time.perf_counter()
                await client.get(f"{self.server.url}/health/liveness")
                self.health.append(time.perf_counter() - started)
                await asyncio.sleep(0.02)

    async def _rss(self) -> None:
        while True:
            self.rss.append(rss_mb(self.pid))
            await asyncio.sleep(0.05)

    async def __aenter__(self) -> Watch:
        self.base_rss = rss_mb(self.pid)
        self.lag = LagProbe().__enter__()
        self.tasks = [asyncio.create_task(f()) for f in (self._echo, self._health, self._rss)]
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.lag.__exit__()

    def figures(self) -> dict[str, float]:
        return {
            "rss_growth_mb": max(self.rss, default=self.base_rss) - self.base_rss,
            "echo_worst_ms": max(self.echo, default=0) * 1000,
            "health_worst_ms": max(self.health, default=0) * 1000,
            "loop_worst_ms": max(self.lag.delays, default=0) * 1000,
        }


async def populate(server: LocalServer, api, files: int, big_mb: int) -> None:
    controller = await api.get_service("public/server-apps")
    await controller.install(
        manifest={
            "name": "Bench staging",
            "type": "conda-jupyter-kernel",
            "version": "0.1.0",
            "dependencies": ["python"],
        },
        files=[{"name": MARKER, "content": "x", "format": "text"}],
        app_id=APP_ID,
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )
    await asyncio.to_thread(write_into_s3, server.s3_url, files, big_mb)


def write_into_s3(s3_url: str, files: int, big_mb: int) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id="local",
        aws_secret_access_key="local-secret",
        region_name="us-east-1",
    )
    bucket = "hypha-workspaces"
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=WORKSPACE)
        for obj in page.get("Contents", [])
    ]
    (marker,) = [k for k in keys if k.endswith("/" + MARKER)]
    prefix = marker.removesuffix(MARKER)
    for i in range(files):
        # Small files of a few hundred bytes to a few KB, in ten subfolders.
        body = (f"line {i}\n" * (20 + i % 300)).encode()
        s3.put_object(Bucket=bucket, Key=f"{prefix}many/part{i % 10}/f{i:04d}.txt", Body=body)
    s3.put_object(Bucket=bucket, Key=f"{prefix}big/model.bin", Body=b"\x5a" * (big_mb * 1024**2))


async def measure(
    label: str,
    action: Callable[[Path], Awaitable[object]],
    runs: int,
    watch: Callable[[], Watch],
    root: Path,
) -> dict[str, float]:
    seconds: list[float] = []
    worst: dict[str, float] = {}
    for run in range(runs):
        dest = root / f"{label}-{run}"
        dest.mkdir(parents=True)
        async with watch() as w:
            started = time.perf_counter()
            await action(dest)
            seconds.append(time.perf_counter() - started)
        for key, value in w.figures().items():
            worst[key] = max(worst.get(key, 0.0), value)
        await asyncio.to_thread(shutil.rmtree, dest)
        print(f"  {label} run {run + 1}: {seconds[-1]:.2f} s", flush=True)
    return {"seconds": statistics.median(seconds), **worst}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1100)
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-file-runs", type=int, default=None, help="default: --runs")
    parser.add_argument(
        "--shared-s3-session",
        action="store_true",
        help="load benchmarks/shared_s3_session.py into the server (what a Hypha fix gives)",
    )
    args = parser.parse_args()
    from hypha_rpc import connect_to_server

    with tempfile.TemporaryDirectory(prefix="bench-staging-") as tmp:
        root = Path(tmp)
        env = {"CONDA_WORKING_DIR": str(root / "sessions"), "CONDA_CACHE_DIR": str(root / "cache")}
        extra: tuple[str, ...] = ()
        if args.shared_s3_session:
            env["PYTHONPATH"] = str(Path(__file__).parent)
            extra = ("shared_s3_session:hypha_startup",)
        server = LocalServer(root / "srv", plugin_env=env, extra_startup_functions=extra)
        async with server:
            token = await server.user_token(WORKSPACE)
            api = await connect_to_server(
                {"server_url": server.url, "workspace": WORKSPACE, "token": token}
            )
            print(f"Writing {args.files} small files and one {args.big_mb} MB file ...", flush=True)
            await populate(server, api, args.files, args.big_mb)
            pid = server_pid(server.port)
            files = AppFiles(f"{server.url}/{WORKSPACE}/artifacts/{APP_ID}/files", token=token)
            limits = StagingLimits(max_files=100_000, max_bytes=100 * 1024**3)

            def stage(rules: list[str], **options: object):
                async def run(dest: Path) -> None:
                    await stage_files(
                        parse_stage_rules(rules),
                        dest=dest,
                        files=files,
                        progress=quiet,
                        limits=limits,
                        **options,
                    )

                return run

            def watch() -> Watch:
                return Watch(api, server, pid)

            work = root / "work"
            idle = await measure("idle", lambda _: asyncio.sleep(2.0), 1, watch, work)
            per_file_runs = args.per_file_runs or args.runs
            many = {
                "one request per file": await measure(
                    "many-per-file", stage(["many/"], use_zip=False), per_file_runs, watch, work
                ),
                "zip batches": await measure("many-zip", stage(["many/"]), args.runs, watch, work),
            }
            big = {
                "one request": await measure(
                    "big-request", stage(["big/model.bin"]), args.runs, watch, work
                ),
                "folder rule, as the worker does": await measure(
                    "big-auto", stage(["big/"]), args.runs, watch, work
                ),
                "folder rule, zip forced": await measure(
                    "big-zip", stage(["big/"], zip_member_limit=2**40), args.runs, watch, work
                ),
            }
            await api.disconnect()

    patched = ", Hypha patched to share one S3 session" if args.shared_s3_session else ""
    print(f"\nHypha server on loopback, moto S3{patched}; medians of {args.runs} runs")
    for title, rows in (
        (f"Staging {args.files} small files", many),
        (f"Staging one {args.big_mb} MB file", big),
    ):
        baseline = next(iter(rows.values()))["seconds"]
        print_table(
            title,
            [(name, r["seconds"], baseline / r["seconds"]) for name, r in rows.items()],
            unit="s",
        )
    everything = {"idle (baseline)": idle, **many, **big}
    for key, title, unit in (
        ("rss_growth_mb", "Hypha server RSS growth during staging (worst run)", "MB"),
        ("echo_worst_ms", "Worst websocket echo round trip during staging", "ms"),
        ("health_worst_ms", "Worst HTTP health check during staging", "ms"),
        ("loop_worst_ms", "Worst event-loop lag of the staging process", "ms"),
    ):
        base = idle[key] or None
        print_table(
            title,
            [(name, r[key], r[key] / base if base else None) for name, r in everything.items()],
            unit=unit,
        )


if __name__ == "__main__":
    asyncio.run(main())
