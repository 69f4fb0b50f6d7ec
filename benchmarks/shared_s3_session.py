"""A startup function for benchmarks only: Hypha's artifact manager with one S3 session.

Hypha 0.21.137 builds a new aiobotocore session for every S3 client
(``ArtifactController._create_client_async`` calls ``get_session()`` each time), and a
new session loads botocore's S3 service model again: about 80 ms of CPU on the server's
event loop for every file served, listed or zipped, against about 6 ms with a shared
session. ``bench_staging.py --shared-s3-session`` loads this into the server to show
what a fix in Hypha would give; the worker itself never patches its host.
"""

from __future__ import annotations

from typing import Any


async def hypha_startup(server: Any) -> None:
    import hypha.artifact
    from aiobotocore.session import get_session

    shared = get_session()
    hypha.artifact.get_session = lambda: shared
