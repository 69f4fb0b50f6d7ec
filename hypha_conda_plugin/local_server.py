"""A local Hypha server with this plugin and an S3-compatible store, on loopback.

Used by ``python -m hypha_conda_plugin serve``, the demo and the test suite, so all three
start the server the same way. The S3 store is moto's server (in memory); it is only
needed for the artifact manager (app files, ``files_to_stage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

READY_TIMEOUT = 90.0


class LocalServerError(RuntimeError):
    """The local server did not come up; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalServer:
    """Handle of a running local server: its URL, root token and folders."""

    workdir: Path
    port: int = 0
    s3: bool = True
    server_apps: bool = True
    #: Serve services as MCP tools at /{workspace}/mcp/{service_id}/mcp (--enable-mcp).
    mcp: bool = False
    #: Register the in-server worker (our startup function); off for standalone setups.
    in_server_worker: bool = True
    plugin_env: Mapping[str, str] = field(default_factory=dict)
    wait_for_worker: bool = True
    # 64+ characters: hypha refuses a shorter root token that happens to contain "123",
    # "abc", ... (about 2% of 48 random hex digits did, and the server would not start).
    root_token: str = field(default_factory=lambda: "local-" + secrets.token_hex(32))
    #: More ``module:function`` startup functions, after the worker's (benchmarks).
    extra_startup_functions: tuple[str, ...] = ()
    #: The S3 store's URL (moto, access key ``local`` / ``local-secret``), once started.
    s3_url: str | None = None
    _processes: list[tuple[asyncio.subprocess.Process, IO[bytes]]] = field(default_factory=list)
    _server: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def server_pid(self) -> int | None:
        """Pid of the Hypha server process (the worker's, in-server): for measurements."""
        return self._server.pid if self._server is not None else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "hypha.log"

    async def __aenter__(self) -> LocalServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.workdir = self.workdir.resolve()
        await asyncio.to_thread(self.workdir.mkdir, parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--root-token",
            self.root_token,
            "--database-uri",
            f"sqlite+aiosqlite:///{self.workdir / 'hypha.db'}",
        ]
        try:
            if self.s3:
                s3_port = free_port()
                await self._spawn(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                    "s3.log",
                    os.environ,
                )
                await self._wait_ready(f"http://127.0.0.1:{s3_port}/moto-api/", "s3.log")
                self.s3_url = f"http://127.0.0.1:{s3_port}"
                args += [
                    "--enable-s3",
                    "--endpoint-url",
                    f"http://127.0.0.1:{s3_port}",
                    "--access-key-id",
                    "local",
                    "--secret-access-key",
                    "local-secret",
                    "--region-name",
                    "us-east-1",
                    "--enable-s3-proxy",
                ]
            if self.server_apps:
                args.append("--enable-server-apps")
            if self.mcp:
                args.append("--enable-mcp")
            functions = [
                *(["hypha_conda_plugin:hypha_startup"] if self.in_server_worker else []),
                *self.extra_startup_functions,
            ]
            if functions:
                args += ["--startup-functions", *functions]
            env = {**os.environ, **self.plugin_env}
            self._server = await self._spawn(
                [sys.executable, "-m", "hypha.server", *args], "hypha.log", env
            )
            await self._wait_ready(f"{self.url}/health/readiness", "hypha.log")
            if self.wait_for_worker and self.in_server_worker:
                await self._wait_worker()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every process (their whole groups), newest first; idempotent."""
        while self._processes:
            process, log = self._processes.pop()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except asyncio.TimeoutError:  # the builtin only from Python 3.11
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
            log.close()

    async def _spawn(
        self, argv: list[str], log_name: str, env: Mapping[str, str]
    ) -> asyncio.subprocess.Process:
        log = await asyncio.to_thread(open, self.workdir / log_name, "ab")
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
        self._processes.append((process, log))
        return process

    async def _wait_ready(self, url: str, log_name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                process = self._processes[-1][0]
                if process.returncode is not None:
                    raise LocalServerError(self._failure(log_name, "exited"))
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code < 500:
                        return
                await asyncio.sleep(0.2)
        raise LocalServerError(self._failure(log_name, f"was not ready in {READY_TIMEOUT} s"))

    async def _wait_worker(self) -> None:
        """Readiness comes before startup functions finish: wait for our service too."""
        service = self.plugin_env.get("CONDA_SERVICE_ID", "conda-worker")
        url = f"{self.url}/public/services/{service}"
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise LocalServerError(self._failure("hypha.log", f"never registered '{service}'"))

    def _failure(self, log_name: str, what: str) -> str:
        path = self.workdir / log_name
        tail = path.read_text(errors="replace")[-3000:] if path.exists() else ""
        return f"{log_name.removesuffix('.log')} {what}. End of {path}:\n{tail}"

    async def user_token(self, workspace: str) -> str:
        """A read-write token for a persistent workspace (created if needed)."""
        from hypha_rpc import connect_to_server

        root = await connect_to_server({"server_url": self.url, "token": self.root_token})
        try:
            with contextlib.suppress(Exception):
                await root.create_workspace(
                    {"id": workspace, "name": workspace, "persistent": True}, overwrite=False
                )
            return await root.generate_token(
                {"workspace": workspace, "permission": "read_write", "expires_in": 24 * 3600}
            )
        finally:
            await root.disconnect()
