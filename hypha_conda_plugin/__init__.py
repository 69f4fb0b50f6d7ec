"""Hypha worker that runs Jupyter kernels in isolated conda environments.

Importing the package stays cheap: the Hypha server imports it to find
``hypha_startup`` and nothing heavy (rattler, jupyter_client) should load until the
worker actually starts.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "hypha_startup"]


async def hypha_startup(server: Any) -> None:
    """Register the conda worker inside a running Hypha server (startup function)."""
    from hypha_conda_plugin.startup import hypha_startup as _startup

    await _startup(server)
