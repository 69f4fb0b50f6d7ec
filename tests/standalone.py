"""Standalone workers for the tests: real `python -m hypha_conda_plugin` processes.

Each runs as an operator would start it (flags, HYPHA_*/CONDA_* variables) and registers
with a test server; the helper waits for its "registered" line and stops it with SIGTERM
(as Kubernetes would), killing its process group if it does not exit in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

REGISTERED = re.compile(r"registered as (\S+);")


@dataclass
class StandaloneWorker:
    service_id: str  # the full id: "<workspace>/<client id>:<service id>"
    log_path: Path
    process: asyncio.subprocess.Process

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def standalone_worker(
    server_url: str,
    workspace: str,
    token: str,
    service_id: str,
    *,
    folder: Path,
    cache_dir: Path,
    channel_alias: str,
    extra_args: tuple[str, ...] = (),
    timeout: float = 90.0,
) -> AsyncIterator[StandaloneWorker]:
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / f"{service_id}.log"
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("HYPHA_", "CONDA_"))
    }
    env["CONDA_CHANNEL_ALIAS"] = channel_alias
    argv = [
        sys.executable,
        "-m",
        "hypha_conda_plugin",
        "--server-url",
        server_url,
        "--workspace",
        workspace,
        "--token",
        token,
        "--service-id",
        service_id,
        "--cache-dir",
        str(cache_dir),
        "--working-dir",
        str(folder / f"{service_id}-sessions"),
        *extra_args,
    ]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            match = REGISTERED.search(log_path.read_text(errors="replace"))
            if match:
                break
            if process.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {service_id} did not register:\n{log_path.read_text()}")
            await asyncio.sleep(0.2)
        yield StandaloneWorker(match.group(1), log_path, process)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 30)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
