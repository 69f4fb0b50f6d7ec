"""Reading an app's files from the Hypha server (entry point, ``files_to_stage``).

An app started by Hypha's app controller keeps its files in the artifact manager,
served over HTTP under ``{server}/{workspace}/artifacts/{alias}/files/``. Everything
that reads them goes through ``AppFiles`` so the URL rules, the token and the TLS choice
are worked out in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from hypha_conda_plugin.errors import AppFileError

#: Connect quickly or fail; a big file may take a while to arrive.
TIMEOUT = httpx.Timeout(60.0, connect=20.0)
#: Serve files through Hypha itself rather than redirect to presigned S3 URLs, which a
#: worker on another machine may not be able to reach.
PROXY_PARAMS = {"use_proxy": "true"}

APP_KEYS = ("app_id", "artifact_id", "app_files_base_url")
#: The entry point's size limit when the caller gives none (``Settings.max_entry_point_bytes``).
DEFAULT_MAX_TEXT_BYTES = 1024**2


@dataclass(frozen=True)
class AppFiles:
    """Where one app's files are and the credentials to read them."""

    base_url: str
    token: str | None = None
    verify_ssl: bool = True
    #: Which version of the app's files to read: a version name or index, or the staged
    #: (uncommitted) files; neither means the latest committed version.
    version: str | None = None
    stage: bool = False

    @property
    def params(self) -> dict[str, str]:
        """Query parameters every request for the app's files carries."""
        params = dict(PROXY_PARAMS)
        if self.stage:
            params["stage"] = "true"
        elif self.version is not None:
            params["version"] = self.version
        return params

    @classmethod
    def for_start(cls, config: Mapping[str, Any], server_url: str | None) -> AppFiles | None:
        """The files of the app a ``start`` config names, or None for a bare session."""
        if not any(config.get(key) for key in APP_KEYS):
            return None
        base = config.get("app_files_base_url")
        if not base:
            server = config.get("server_url") or server_url
            artifact = config.get("artifact_id") or (
                f"{config.get('workspace')}/{config.get('app_id')}"
            )
            workspace, _, alias = str(artifact).rpartition("/")
            base = f"{server}/{workspace}/artifacts/{alias}/files"
        return cls(
            base_url=str(base),
            token=config.get("token") or None,
            verify_ssl=not config.get("disable_ssl"),
        )

    @property
    def zip_url(self) -> str | None:
        """The artifact's ``create-zip-file`` endpoint, beside ``files``; None when the
        files URL has another shape (then files are fetched one by one)."""
        base = self.base_url.rstrip("/")
        if not base.endswith("/files"):
            return None
        return base.removesuffix("/files") + "/create-zip-file"

    @property
    def zip_params(self) -> dict[str, str]:
        """The version parameter of ``create-zip-file``: it takes ``version`` only, where
        the staged files are ``version=stage`` (it ignores ``stage=true``)."""
        if self.stage:
            return {"version": "stage"}
        if self.version is not None:
            return {"version": self.version}
        return {}

    def url(self, path: str, *, folder: bool = False) -> str:
        """URL of a file, or of a folder's listing (a trailing '/' asks for JSON)."""
        return f"{self.base_url.rstrip('/')}/{quote(path.strip('/'))}" + ("/" if folder else "")

    def client(self, max_connections: int = 4) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.AsyncClient(
            headers=headers,
            timeout=TIMEOUT,
            limits=httpx.Limits(max_connections=max_connections),
            follow_redirects=True,
            verify=self.verify_ssl,
            params=self.params,
        )

    async def read_text(self, path: str, max_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> str:
        """A small text file, such as the entry point, of at most ``max_bytes`` bytes.

        The body is streamed and counted, so a server (or a caller's URL) that sends a
        huge or endless body costs at most ``max_bytes`` of memory.
        """
        url = self.url(path)
        chunks: list[bytes] = []
        size = 0
        try:
            async with self.client(max_connections=1) as client:
                async with client.stream("GET", url) as response:
                    response.raise_for_status()
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise _too_big(path, int(declared), max_bytes)
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise _too_big(path, size, max_bytes, at_least=True)
                        chunks.append(chunk)
        except httpx.HTTPError as error:
            raise AppFileError(
                f"Could not read the app's file '{path}' from {url}: {error}. Check that "
                "the file is part of the app and the manifest names it correctly."
            ) from error
        return b"".join(chunks).decode("utf-8", errors="replace")


def _too_big(path: str, size: int, limit: int, *, at_least: bool = False) -> AppFileError:
    return AppFileError(
        f"The app's file '{path}' is {'at least ' if at_least else ''}{size} bytes; the "
        f"entry point may be at most {limit} bytes (CONDA_MAX_ENTRY_POINT_BYTES={limit}). "
        "Keep the entry point small and stage bigger files with files_to_stage, or ask "
        "the operator to raise the limit."
    )
