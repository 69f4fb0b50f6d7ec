"""Driver of scripts/demo.sh: local server up, examples/client.py, server down."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import httpx
import hypha_rpc.rpc  # noqa: F401

from hypha_conda_plugin.local_server import LocalServer

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".cache" / "demo"
# hypha-rpc warns "Connection lost" even when a connection is closed on purpose (and
# sets its logger's level when first imported, hence the import above).
logging.getLogger("RPC").setLevel(logging.ERROR)
CONDA_FORGE_PROBE = "https://conda.anaconda.org/conda-forge/noarch/repodata.json"


def conda_forge_reachable() -> bool:
    try:
        return httpx.head(CONDA_FORGE_PROBE, timeout=5, follow_redirects=True).status_code < 400
    except httpx.HTTPError:
        return False


def channel_alias() -> dict[str, str]:
    """Point the worker at an offline channel when conda-forge cannot be reached."""
    if os.environ.get("CONDA_CHANNEL_ALIAS") or conda_forge_reachable():
        return {}
    from hypha_conda_plugin.channel import build_channel

    out = REPO / ".cache" / "offline-channel"
    print(f"conda-forge is not reachable: building an offline channel in {out} first.", flush=True)
    result = build_channel(out, ["numpy", "pandas"], log=lambda _: None)
    return {"CONDA_CHANNEL_ALIAS": result.alias_url}


async def main() -> int:
    plugin_env = {
        **channel_alias(),
        "CONDA_WORKING_DIR": str(STATE / "sessions"),
        "CONDA_CACHE_DIR": str(STATE / "conda-cache"),
    }
    async with LocalServer(
        STATE / "server", s3=False, server_apps=False, plugin_env=plugin_env
    ) as server:
        print(f"Hypha server with the conda worker running at {server.url}", flush=True)
        token = await server.user_token("demo")
        env = {
            **os.environ,
            "HYPHA_SERVER_URL": server.url,
            "HYPHA_WORKSPACE": "demo",
            "HYPHA_TOKEN": token,
        }
        client = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "examples" / "client.py"), env=env
        )
        code = await client.wait()
    print("Server stopped.")
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
