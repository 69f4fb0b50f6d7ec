"""Sessions through a real Hypha server: how fast they start and run, and whether the
server keeps answering while they do.

* start on a cached environment: with warm kernels (a pause between starts lets the pool
  refill), without (a kernel starts), and a bare jupyter_client kernel start on the same
  environment (baseline);
* execute ``1 + 1`` through Hypha against bare jupyter_client (baseline);
* 8 sessions x 50 cells at once: cells per second, p50 and p99 latency;
* the server's responsiveness (worst websocket ``echo`` / health round trip, measured
  from a thread of its own) during each phase: a cold build, 10 concurrent starts on a
  cached environment, 10 concurrent busy cells, 10 stops of sessions holding 1,000
  files each; idle is the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from hypha_rpc import connect_to_server  # noqa: E402
from measure import bare_execute, offline_alias, pct, start_bare_kernel, stop_bare_kernel, timed  # noqa: E402
from server_probe import ProbeReport, ServerProbe  # noqa: E402
from tables import print_table  # noqa: E402

from hypha_conda_plugin.local_server import LocalServer  # noqa: E402

MANIFEST = {"dependencies": ["python", "numpy"]}


async def raw_kernel(python: Path, folder: Path, runs: int, executes: int) -> tuple[list, list]:
    """Bare jupyter_client on the same environment: start times and execute times."""
    starts, cells = [], []
    for run in range(runs):
        began = time.perf_counter()
        km, kc = await start_bare_kernel(python, folder)
        starts.append(time.perf_counter() - began)
        if run == 0:
            for _ in range(executes):
                cells.append(await timed(lambda kc=kc: bare_execute(kc, timeout=30)))
        await stop_bare_kernel(km, kc)
    return starts, cells


async def raw_concurrent(python: Path, folder: Path, kernels: int, cells: int) -> tuple:
    """Baseline for the load test: ``kernels`` bare jupyter_client kernels of the same
    environment in this process, ``cells`` cells each, all at once (no Hypha, no worker):
    what the machine and jupyter_client alone give. Returns (cells/s, latencies)."""
    started = [await start_bare_kernel(python, folder) for _ in range(kernels)]
    latencies: list[float] = []

    async def run(kc) -> None:
        for _ in range(cells):
            latencies.append(await timed(lambda: bare_execute(kc, timeout=30)))

    began = time.perf_counter()
    await asyncio.gather(*(run(kc) for _, kc in started))
    wall = time.perf_counter() - began
    for km, kc in started:
        await stop_bare_kernel(km, kc)
    return len(latencies) / wall, latencies


async def probe_phase(server, token, action) -> ProbeReport:
    """The server's round trips while ``action`` runs."""
    with ServerProbe(server.url, token) as probe:
        await asyncio.sleep(0.2)
        await action()
        await asyncio.sleep(0.2)
    return probe.report


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--executes", type=int, default=50)
    parser.add_argument("--pause", type=float, default=2.0, help="between pooled starts")
    args = parser.parse_args()
    alias = offline_alias()
    ms = 1000.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_env = {
            "CONDA_CHANNEL_ALIAS": alias,
            "CONDA_CACHE_DIR": str(root / "cache"),
            "CONDA_WORKING_DIR": str(root / "sessions"),
            "CONDA_MAX_SESSIONS": "40",
            "CONDA_MAX_SESSIONS_PER_WORKSPACE": "40",
        }
        lag: list[tuple[str, ProbeReport]] = []
        async with LocalServer(
            root / "srv-pool", s3=False, server_apps=False, plugin_env=base_env
        ) as server:
            token = await server.user_token("bench")
            api = await connect_to_server(
                {"server_url": server.url, "workspace": "bench", "token": token}
            )
            worker = await api.get_service("public/conda-worker")
            with ServerProbe(server.url, token) as idle:
                await asyncio.sleep(3)
            lag.append(("idle server (baseline)", idle.report))

            async def cold() -> None:
                sid = await worker.start({"id": "cold", "manifest": MANIFEST})
                await worker.stop(sid)

            lag.append(("cold build + first session", await probe_phase(server, token, cold)))
            info_sid = await worker.start({"id": "info", "manifest": MANIFEST})
            prefix = Path((await worker.get_session_info(info_sid))["environment"])
            await worker.stop(info_sid)
            await asyncio.sleep(5)  # background bytecode, pool refill

            pooled = []
            for run in range(args.runs):
                await asyncio.sleep(args.pause)
                began = time.perf_counter()
                sid = await worker.start({"id": f"p{run}", "manifest": MANIFEST})
                pooled.append(time.perf_counter() - began)
                await worker.stop(sid)

            sid = await worker.start({"id": "cells", "manifest": MANIFEST})
            through = [
                await timed(lambda: worker.execute(sid, "1 + 1")) for _ in range(args.executes)
            ]
            await worker.stop(sid)

            ids = [await worker.start({"id": f"m{i}", "manifest": MANIFEST}) for i in range(8)]
            latencies: list[float] = []

            async def run_cells(session: str) -> None:
                for _ in range(50):
                    latencies.append(await timed(lambda: worker.execute(session, "1 + 1")))

            began = time.perf_counter()
            await asyncio.gather(*(run_cells(s) for s in ids))
            wall = time.perf_counter() - began
            for s in ids:
                await worker.stop(s)

            async def ten_starts() -> None:
                started = await asyncio.gather(
                    *(worker.start({"id": f"c{i}", "manifest": MANIFEST}) for i in range(10))
                )
                ten_starts.ids = started

            lag.append(
                ("10 concurrent cached starts", await probe_phase(server, token, ten_starts))
            )

            async def busy() -> None:
                await asyncio.gather(
                    *(worker.execute(s, "sum(range(3 * 10**7))") for s in ten_starts.ids)
                )

            lag.append(("10 concurrent busy cells", await probe_phase(server, token, busy)))
            for s in ten_starts.ids:
                await worker.execute(
                    s,
                    "import os\nos.makedirs('many', exist_ok=True)\n"
                    "for i in range(1000): open(f'many/{i}.txt', 'w').write('x')",
                )

            async def stops() -> None:
                await asyncio.gather(*(worker.stop(s) for s in ten_starts.ids))

            lag.append(("10 stops, 1,000 files each", await probe_phase(server, token, stops)))
            await api.disconnect()

        async with LocalServer(
            root / "srv-nopool",
            s3=False,
            server_apps=False,
            plugin_env={**base_env, "CONDA_KERNEL_POOL_SIZE": "0"},
        ) as server:
            token = await server.user_token("bench")
            api = await connect_to_server(
                {"server_url": server.url, "workspace": "bench", "token": token}
            )
            worker = await api.get_service("public/conda-worker")
            fresh = []
            for run in range(max(5, args.runs // 2)):
                began = time.perf_counter()
                sid = await worker.start({"id": f"f{run}", "manifest": MANIFEST})
                fresh.append(time.perf_counter() - began)
                await worker.stop(sid)
            await api.disconnect()

        raw_starts, raw_cells = await raw_kernel(
            prefix / "bin" / "python", root / "raw", max(5, args.runs // 2), args.executes
        )
        raw_rate, raw_latencies = await raw_concurrent(
            prefix / "bin" / "python", root / "raw", 8, 50
        )

    med = statistics.median
    base = med(raw_starts)
    print(f"python + numpy environment; {args.runs} pooled starts, {args.pause:g} s apart")
    print_table(
        "Start on a cached environment (through Hypha)",
        [
            ("bare jupyter_client kernel start (baseline)", base * ms, 1.0),
            ("session start, no warm kernel (p50)", med(fresh) * ms, med(fresh) / base),
            ("session start, warm kernel (p50)", med(pooled) * ms, med(pooled) / base),
            ("session start, warm kernel (p90)", pct(pooled, 0.9) * ms, pct(pooled, 0.9) / base),
        ],
        "ms",
    )
    raw_cell = med(raw_cells)
    print_table(
        "Execute '1 + 1'",
        [
            ("bare jupyter_client (baseline)", raw_cell * ms, 1.0),
            ("through Hypha and the worker", med(through) * ms, med(through) / raw_cell),
        ],
        "ms",
    )
    print(f"\nAdded by Hypha and the worker: {(med(through) - raw_cell) * ms:.1f} ms per cell")
    rate = len(latencies) / wall
    print_table(
        "8 sessions x 50 cells at once, through Hypha (bare jupyter_client kernels: baseline)",
        [
            ("cells per second, baseline", raw_rate, 1.0),
            ("cells per second", rate, rate / raw_rate),
            ("p50 latency, ms, baseline", pct(raw_latencies, 0.5) * ms, 1.0),
            (
                "p50 latency, ms",
                pct(latencies, 0.5) * ms,
                pct(latencies, 0.5) / pct(raw_latencies, 0.5),
            ),
            ("p99 latency, ms, baseline", pct(raw_latencies, 0.99) * ms, 1.0),
            (
                "p99 latency, ms",
                pct(latencies, 0.99) * ms,
                pct(latencies, 0.99) / pct(raw_latencies, 0.99),
            ),
            ("worst latency, ms, baseline", max(raw_latencies) * ms, None),
            ("worst latency, ms", max(latencies) * ms, None),
        ],
        "value",
    )
    rows = []
    for label, report in lag:
        samples = sorted(report.echo + report.health)
        rows.append((f"{label}: p99", pct(samples, 0.99) * ms, None))
        rows.append((f"{label}: worst", report.worst_ms(), None))
    print_table("Server's echo/health round trips (from a process of their own) during", rows, "ms")


if __name__ == "__main__":
    asyncio.run(main())
