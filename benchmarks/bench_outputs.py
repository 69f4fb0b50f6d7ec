"""What a cell's output costs the Hypha server, and what the output cap buys.

* flood: cells printing 1 KiB, 15 MiB (under the 16 MiB cap) and 200 MB (cut at the
  cap) through a local Hypha server with the worker inside; for each, the call's time,
  how much the server's RSS grew, and another client's ``echo`` round trips meanwhile
  (median and slowest), against echoes with nothing running (baseline, same run).
* merging: a stream of many small chunks merged the old way (``text +=`` on the stored
  item, the baseline) and by ``CellOutputs`` (chunks in a list, joined once).
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
from measure import offline_alias, rss_mb  # noqa: E402
from tables import print_table  # noqa: E402

from hypha_conda_plugin.local_server import LocalServer  # noqa: E402
from hypha_conda_plugin.outputs import CellOutputs  # noqa: E402

CELLS = {
    "print 1 KiB": "print('x' * 1024)",
    "print 15 MiB (under the cap)": "for i in range(15):\n    print('x' * (2**20 - 1))",
    "print 200 MB in 1 MB lines (cut at 16 MiB)": "for i in range(200):\n    print('x' * 10**6)",
}


async def echoes_while(other, pid: int, work) -> tuple[float, list[float], float]:
    """Run ``work()``; meanwhile echo round trips (ms) and the server's peak RSS growth."""
    before = peak = rss_mb(pid)
    trips: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            started = time.perf_counter()
            await other.echo("ping")
            trips.append((time.perf_counter() - started) * 1000)
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    started = time.perf_counter()
    try:
        await work()
    finally:
        elapsed = time.perf_counter() - started
        done.set()
        await watcher
    return elapsed, trips, max(peak, rss_mb(pid)) - before


async def flood(runs: int) -> None:
    alias = offline_alias()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plugin_env = {
            "CONDA_CHANNEL_ALIAS": alias,
            "CONDA_CACHE_DIR": str(root / "cache"),
            "CONDA_WORKING_DIR": str(root / "work"),
        }
        async with LocalServer(
            root / "srv", s3=False, server_apps=False, plugin_env=plugin_env
        ) as server:
            apis = []
            for workspace in ("bench-flood", "bench-other"):
                token = await server.user_token(workspace)
                apis.append(
                    await connect_to_server(
                        {"server_url": server.url, "workspace": workspace, "token": token}
                    )
                )
            api, other = apis
            worker = await api.get_service("public/conda-worker")
            session = await worker.start({"manifest": {"dependencies": ["python"]}})
            pid = server.server_pid
            assert pid is not None

            idle_trips: list[float] = []
            for _ in range(runs):
                _, trips, _ = await echoes_while(other, pid, lambda: asyncio.sleep(1.0))
                idle_trips += trips
            rows = [("nothing running (baseline)", 0.0, idle_trips, 0.0)]
            for label, code in CELLS.items():
                times, trips, growth = [], [], []
                for _ in range(runs):
                    elapsed, run_trips, grew = await echoes_while(
                        other, pid, lambda code=code: worker.execute(session, code)
                    )
                    times.append(elapsed)
                    trips += run_trips
                    growth.append(grew)
                rows.append((label, statistics.median(times), trips, max(growth)))
            await worker.stop(session)
            for client in apis:
                await client.disconnect()

    base_p50 = statistics.median(idle_trips)
    base_max = max(idle_trips)
    print(f"{runs} runs of each cell; the server keeps the default 16 MiB cap")
    print_table(
        "Another client's echo round trip, median",
        [(label, statistics.median(t), statistics.median(t) / base_p50) for label, _, t, _ in rows],
        unit="ms",
    )
    print_table(
        "Another client's echo round trip, slowest",
        [(label, max(t), max(t) / base_max) for label, _, t, _ in rows],
        unit="ms",
    )
    print_table(
        "The execute call, median", [(label, s, None) for label, s, _, _ in rows[1:]], unit="s"
    )
    print_table(
        "Hypha server RSS growth during the call, largest",
        [(label, g, None) for label, _, _, g in rows[1:]],
        unit="MB",
    )


async def merging(chunks: int, size: int) -> None:
    pieces = ["y" * (size - 1) + "\n" for _ in range(chunks)]

    started = time.perf_counter()
    item = {"type": "stream", "name": "stdout", "text": ""}
    for piece in pieces:  # what CellOutputs did before: the stored item grows by copy
        item["text"] += piece
    naive = time.perf_counter() - started

    started = time.perf_counter()
    cell = CellOutputs()
    for piece in pieces:
        await cell.handle({"msg_type": "stream", "content": {"name": "stdout", "text": piece}})
    assert cell.from_reply({"status": "ok"})["outputs"][0]["text"] == item["text"]
    joined = time.perf_counter() - started
    print_table(
        f"Merging {chunks} stream chunks of {size} bytes",
        [
            ("text += chunk on the stored item (baseline)", naive * 1000, 1.0),
            ("CellOutputs: chunks in a list, joined once", joined * 1000, joined / naive),
        ],
        unit="ms",
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--chunk-size", type=int, default=200)
    args = parser.parse_args()
    await merging(args.chunks, args.chunk_size)
    await flood(args.runs)


if __name__ == "__main__":
    asyncio.run(main())
