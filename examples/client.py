"""Walkthrough client: start a conda session, run a cell, print its outputs, stop.

    HYPHA_SERVER_URL=... HYPHA_WORKSPACE=... HYPHA_TOKEN=... python examples/client.py

The worker builds (or reuses) an environment with numpy and pandas, starts a Jupyter
kernel in it, and returns each cell's outputs in Jupyter's format.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from hypha_rpc import connect_to_server

CELL = """
import numpy as np
import pandas as pd

# Create some data
data = np.array([1, 2, 3, 4, 5])
df = pd.DataFrame({'values': data})

# Perform calculations
mean_val = df['values'].mean()
std_val = df['values'].std()
sum_val = df['values'].sum()

print(f"Mean: {mean_val}")
print(f"Standard deviation: {std_val}")
print(f"Sum: {sum_val}")
"""


# hypha-rpc warns "Connection lost" even when we disconnect on purpose at the end.
logging.getLogger("RPC").setLevel(logging.ERROR)


def show_progress(message: dict) -> None:
    print(f"  [{message.get('type')}] {message.get('message')}")


async def main() -> None:
    server = await connect_to_server(
        {
            "server_url": os.environ.get("HYPHA_SERVER_URL", "http://127.0.0.1:9527"),
            "workspace": os.environ.get("HYPHA_WORKSPACE"),
            "token": os.environ.get("HYPHA_TOKEN"),
        }
    )
    worker = await server.get_service(os.environ.get("CONDA_WORKER_ID", "public/conda-worker"))

    print("Starting a session with numpy and pandas...")
    started = time.monotonic()
    session_id = await worker.start(
        {
            "id": "walkthrough",
            "manifest": {
                "type": "conda-jupyter-kernel",
                "dependencies": ["python", "numpy", "pandas"],
                "channels": ["conda-forge"],
            },
            "progress_callback": show_progress,
        }
    )
    print(f"Session {session_id} ready in {time.monotonic() - started:.1f} s")

    try:
        result = await worker.execute(session_id, CELL, config={"timeout": 60})
        if result["status"] == "ok":
            for output in result["outputs"]:
                if output["type"] == "stream" and output["name"] == "stdout":
                    print("Output:", output["text"], end="")
        else:
            error = result["error"]
            print(f"Error: {error['ename']}: {error['evalue']}")
            print("\n".join(error["traceback"]))
    finally:
        await worker.stop(session_id)
        print(f"Session {session_id} stopped.")
        await server.disconnect()


if __name__ == "__main__":
    asyncio.run(main())
