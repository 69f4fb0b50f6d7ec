"""Entry point of examples/manifest.yaml: runs in the kernel when the app starts.

The worker sets HYPHA_SERVER_URL, HYPHA_WORKSPACE, HYPHA_CLIENT_ID, HYPHA_TOKEN and
HYPHA_APP_ID, so the app can connect back and register its services. Top-level ``await``
works: this runs as a Jupyter cell.
"""

import os
import platform
import sys

import numpy as np
from hypha_rpc import connect_to_server

print("=== Environment Info ===")
print(f"Python version: {sys.version_info.major}.{sys.version_info.minor}")
print(f"Platform: {platform.system()}")
print(f"NumPy version: {np.__version__}")

server = await connect_to_server(  # noqa: F704 - top-level await in a Jupyter cell
    {
        "server_url": os.environ["HYPHA_SERVER_URL"],
        "workspace": os.environ["HYPHA_WORKSPACE"],
        "client_id": os.environ["HYPHA_CLIENT_ID"],
        "token": os.environ["HYPHA_TOKEN"],
    }
)
await server.register_service(  # noqa: F704
    {"id": "default", "mean": lambda values: float(np.mean(values))}
)
print("Application initialized successfully!")
