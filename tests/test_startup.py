"""The startup function must never stop the Hypha server from serving."""

from __future__ import annotations

import asyncio

import httpx

from hypha_conda_plugin.local_server import LocalServer


async def test_bad_plugin_setting_is_logged_and_the_server_keeps_serving(tmp_path):
    server = LocalServer(
        tmp_path,
        s3=False,
        server_apps=False,
        wait_for_worker=False,
        plugin_env={"CONDA_BUILD_TIMEOUT": "soon"},
    )
    async with server:
        async with httpx.AsyncClient() as client:
            for _ in range(50):  # startup functions run after readiness is reported
                if "Conda worker not registered" in server.log_path.read_text():
                    break
                await asyncio.sleep(0.2)
            health = await client.get(f"{server.url}/health/readiness")
            services = await client.get(f"{server.url}/public/services/conda-worker")
    log = server.log_path.read_text()
    assert health.status_code == 200
    assert services.status_code != 200
    assert "Conda worker not registered" in log and "build_timeout" in log
