"""What get_load() costs, the call Hypha's app controller makes on every candidate worker
(2 s timeout each) when an app is placed with ``select:min:get_load``.

* in process: ``get_load()`` with N session records, against ``list_sessions()`` on the
  same worker (baseline, same run);
* over Hypha: the same two calls from a client through a local server's websocket RPC.
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
from tables import print_table  # noqa: E402

from hypha_conda_plugin.local_server import LocalServer  # noqa: E402
from hypha_conda_plugin.sessions import SessionState  # noqa: E402
from hypha_conda_plugin.settings import Settings  # noqa: E402
from hypha_conda_plugin.worker import CondaWorker  # noqa: E402


async def median_us(call, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rpc-calls", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        worker = CondaWorker(Settings(cache_dir=root / "c", working_dir=root / "w"))
        for index in range(args.sessions):
            session = worker.sessions.create(f"ws-{index % 7}", f"s{index}", None)
            session.state = SessionState.READY
        listing = await median_us(worker.list_sessions, args.calls)
        load = await median_us(worker.get_load, args.calls)
        print_table(
            f"In process, {args.sessions} sessions, median of {args.calls} calls",
            [("list_sessions (baseline)", listing, None), ("get_load", load, load / listing)],
            "µs",
        )

        async with LocalServer(root / "server", s3=False, server_apps=False) as server:
            api = await connect_to_server({"server_url": server.url})
            remote = await api.get_service("public/conda-worker")
            listing = await median_us(remote.list_sessions, args.rpc_calls)
            load = await median_us(remote.get_load, args.rpc_calls)
            await api.disconnect()
        print_table(
            f"Over Hypha's websocket RPC, median of {args.rpc_calls} calls",
            [
                ("list_sessions (baseline)", listing / 1000, None),
                ("get_load", load / 1000, load / listing),
            ],
            "ms",
        )


if __name__ == "__main__":
    asyncio.run(main())
