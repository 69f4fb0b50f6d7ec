"""Startup function: registers the worker inside a running Hypha server.

``python -m hypha.server --startup-functions hypha_conda_plugin:hypha_startup``.
If a startup function raises, Hypha stops serving while its process stays alive, so
everything recoverable is logged here and never raised.
"""

from __future__ import annotations

import logging
from typing import Any

from hypha_conda_plugin.settings import Settings

logger = logging.getLogger("hypha_conda_plugin")


async def hypha_startup(server: Any) -> None:
    try:
        settings = Settings.from_env()
    except Exception as error:
        logger.error("Conda worker not registered: %s", error)
        return
    from hypha_conda_plugin.worker import CondaWorker

    config = getattr(server, "config", None) or {}
    server_url = config.get("local_base_url") or config.get("public_base_url")
    worker = CondaWorker(settings, server_url=server_url, in_server=True)
    worker.envs.start_maintenance()  # sweeps what a killed run left, then evicts periodically
    try:
        await server.register_service(worker.service_definition())
    except Exception as error:
        logger.error("Conda worker could not register as '%s': %s", settings.service_id, error)
        return
    logger.info(
        "Conda worker registered as public/%s (working dir %s, cache %s, channel alias %s)",
        settings.service_id,
        settings.working_dir,
        settings.cache_dir,
        settings.channel_alias or "default",
    )
