"""What going through Hypha costs, and what sessions cost in memory.

* latency: ``execute("1 + 1")`` from a client over Hypha's websocket RPC, against the
  same call on a worker in this process (baseline, same run);
* memory: the Hypha server's RSS before and after N sessions (the worker's own share),
  and each session's kernel RSS, bare and after importing numpy and pandas.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from hypha_rpc import connect_to_server  # noqa: E402
from measure import median_ms, offline_alias, rss_mb, tree_rss_mb  # noqa: E402
from tables import print_table  # noqa: E402

from hypha_conda_plugin.local_server import LocalServer  # noqa: E402
from hypha_conda_plugin.settings import Settings  # noqa: E402
from hypha_conda_plugin.worker import CondaWorker  # noqa: E402

MANIFEST = {"dependencies": ["python", "numpy", "pandas"]}
CTX = {"ws": "bench", "user": {"id": "bench-user"}}


def server_pid(port: int) -> int:
    """The hypha.server process listening on ``port`` (found through /proc)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"hypha.server" in cmd and str(port).encode() in cmd:
                return int(entry.name)
    raise RuntimeError("hypha server process not found")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executes", type=int, default=50)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()
    alias = offline_alias()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = CondaWorker(
            Settings(cache_dir=root / "c1", working_dir=root / "w1", channel_alias=alias)
        )
        await local.start({"id": "local", "manifest": MANIFEST}, context=CTX)
        in_process = await median_ms(
            lambda: local.execute("local", "1 + 1", context=CTX), args.executes
        )
        await local.stop("local", context=CTX)
        await local.close()

        plugin_env = {
            "CONDA_CHANNEL_ALIAS": alias,
            "CONDA_CACHE_DIR": str(root / "c2"),
            "CONDA_WORKING_DIR": str(root / "w2"),
            "CONDA_KERNEL_POOL_SIZE": "0",  # the server's RSS without warm kernels' share
        }
        async with LocalServer(
            root / "srv", s3=False, server_apps=False, plugin_env=plugin_env
        ) as server:
            token = await server.user_token("bench")
            api = await connect_to_server(
                {"server_url": server.url, "workspace": "bench", "token": token}
            )
            worker = await api.get_service("public/conda-worker")
            pid = server_pid(server.port)
            before = rss_mb(pid)
            ids = [
                await worker.start({"id": f"s{i}", "manifest": MANIFEST})
                for i in range(args.sessions)
            ]
            after = rss_mb(pid)
            over_rpc = await median_ms(lambda: worker.execute(ids[0], "1 + 1"), args.executes)
            kernel_pids = [(await worker.get_session_info(i))["kernel_pid"] for i in ids]
            bare_kernel = statistics.median(tree_rss_mb(p) for p in kernel_pids)
            for session_id in ids:
                await worker.execute(session_id, "import numpy, pandas")
            loaded_kernel = statistics.median(tree_rss_mb(p) for p in kernel_pids)
            for session_id in ids:
                await worker.stop(session_id)
            await api.disconnect()

    print(f"{args.executes} executes, {args.sessions} sessions; medians")
    print_table(
        "Latency of execute('1 + 1')",
        [
            ("worker in this process (baseline)", in_process, 1.0),
            ("client -> Hypha server -> worker (websocket RPC)", over_rpc, over_rpc / in_process),
        ],
        unit="ms",
    )
    print_table(
        "Memory (RSS)",
        [
            ("Hypha server with the worker, no session (baseline)", before, 1.0),
            (f"same, with {args.sessions} sessions running", after, after / before),
            ("one kernel, fresh", bare_kernel, None),
            ("one kernel after importing numpy and pandas", loaded_kernel, None),
        ],
        unit="MB",
    )


if __name__ == "__main__":
    asyncio.run(main())
