"""``files_to_stage``: copy an app's files from Hypha's artifact manager into a session.

A manifest may list files and folders of the app that its code expects in its working
folder. They are fetched over Hypha's HTTP file API before the kernel starts:
``GET {files_base_url}/{path}`` downloads a file and ``GET {files_base_url}/{folder}/``
(trailing slash) lists a folder as JSON ``[{"name", "type": "file"|"directory"}, ...]``.

Everything that names a path on disk comes from outside: the rules from the manifest's
author, the names in a folder listing from whatever the artifact holds. So the rules are
validated before any work is done, every name in a listing is checked, and every final
path is resolved and must lie inside the session folder. Nothing is written through a
symlink and no symlink is created. Downloads stream to a temporary name in small chunks
written off the event loop (the worker may live inside the Hypha server, where a stall
stalls every user), then are renamed into place, so a half-written file never shows up
under its real name.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.errors import StagingError
from hypha_conda_plugin.stage_rules import StageRule

#: Downloads running at once; enough to hide per-request latency for many small files
#: without opening a flood of connections to the server.
DEFAULT_CONCURRENCY = 4
#: Bytes handed to the writer thread at a time (one thread hop per chunk).
CHUNK_SIZE = 256 * 1024
#: Items per listing request; the server's own default page size.
LISTING_PAGE = 1000
#: Folder nesting we follow; a listing that nests deeper is treated as hostile.
MAX_DEPTH = 64
#: Up to this many files, progress reports every file; above it, about every 5%.
PER_FILE_PROGRESS_LIMIT = 50

_FIX_HINT = "add it to the app's files or remove it from files_to_stage"


@dataclass(frozen=True)
class StagingReport:
    """What staging did, for progress messages, logs and benchmarks."""

    files: int
    bytes: int
    seconds: float = 0.0


@dataclass(frozen=True)
class _Download:
    source: str  # path in the app's files
    target: str  # path relative to the session folder


# ----------------------------------------------------------------------------- staging
async def stage_files(
    rules: Iterable[StageRule],
    *,
    dest: Path,
    files: AppFiles,
    progress: Progress,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> StagingReport:
    """Download the rules' files and folders into ``dest`` (an existing session folder).

    Folders are listed through the same HTTP API and copied recursively. Raises
    :class:`StagingError` naming the path when a file is missing, a download fails or a
    listing names something that would land outside ``dest``; the caller removes the
    session folder, so partial results never outlive a failed start.
    """
    rules = list(rules)
    started = time.monotonic()
    root = await asyncio.to_thread(_resolved_dir, dest)
    async with files.client(max_connections=max(1, concurrency) + 1) as client:
        downloads: list[_Download] = []
        for rule in rules:
            if rule.is_dir:
                await progress(_message(f"Listing folder {rule.source}/ of the app's files", 0.0))
                found = await _list_folder(client, files, rule.source, rule.target)
                if not found:
                    raise StagingError(
                        f"The folder '{rule.source}/' in files_to_stage has no files; {_FIX_HINT}."
                    )
                downloads.extend(found)
            else:
                downloads.append(_Download(rule.source, rule.target))
        # Check every destination before writing anything, so a hostile listing fails the
        # whole staging instead of after half of it.
        targets = await asyncio.to_thread(
            lambda: [_inside(root, d.target, d.source) for d in downloads]
        )
        total = len(downloads)
        await progress(_message(f"Staging {total} file(s) into the session folder", 0.0))
        counter = _Progress(total, progress)
        semaphore = asyncio.Semaphore(max(1, concurrency))

        async def fetch(download: _Download, target: Path) -> int:
            async with semaphore:
                size = await _download(client, files, download, root, target)
            await counter.done(download.target, size)
            return size

        jobs = [fetch(d, target) for d, target in zip(downloads, targets, strict=True)]
        sizes = await _all_or_nothing(jobs)
    report = StagingReport(files=total, bytes=sum(sizes), seconds=time.monotonic() - started)
    await progress(
        _message(
            f"Staged {report.files} file(s), {_human(report.bytes)}, in {report.seconds:.1f} s",
            1.0,
            kind="success",
        )
    )
    return report


async def _list_folder(
    client: httpx.AsyncClient, files: AppFiles, source: str, target: str, depth: int = 0
) -> list[_Download]:
    """Every file under ``source`` (recursively), paired with where it goes."""
    if depth > MAX_DEPTH:
        raise StagingError(
            f"The folder '{source}/' nests more than {MAX_DEPTH} levels deep; refusing to "
            "stage it. Flatten it or stage a smaller subfolder."
        )
    downloads: list[_Download] = []
    for item in await _listing(client, files, source, first_level=depth == 0):
        name = item.get("name") if isinstance(item, dict) else None
        if not _safe_name(name):
            raise StagingError(
                f"The listing of '{source}/' names an unsafe entry {name!r}; refusing to "
                "stage it because it could land outside the session folder. Rename the "
                "file in the app or remove the folder from files_to_stage."
            )
        if item.get("type") == "directory":
            downloads.extend(
                await _list_folder(client, files, f"{source}/{name}", f"{target}/{name}", depth + 1)
            )
        else:
            downloads.append(_Download(f"{source}/{name}", f"{target}/{name}"))
    return downloads


async def _listing(
    client: httpx.AsyncClient, files: AppFiles, source: str, *, first_level: bool
) -> list[Any]:
    """All items of one folder, page by page (the server returns at most ``limit``)."""
    items: list[Any] = []
    url = files.url(source, folder=True)
    while True:
        try:
            response = await client.get(
                url,
                params={"limit": LISTING_PAGE, "offset": len(items)},
            )
        except httpx.HTTPError as error:
            raise StagingError(
                f"Could not list the folder '{source}/' of the app's files: {error}."
            ) from error
        if response.status_code == 404:
            if items:  # an offset past the end: the previous page was exactly full
                return items
            if not first_level:  # listed by its parent a moment ago, now empty: skip
                return items
            raise StagingError(
                f"The folder '{source}/' in files_to_stage is not among the app's files; "
                f"{_FIX_HINT} (if it is a single file, drop the trailing '/')."
            )
        if response.status_code >= 400:
            raise StagingError(
                f"Could not list the folder '{source}/' of the app's files: HTTP "
                f"{response.status_code} {response.text[:200]}"
            )
        try:
            page = response.json()
        except ValueError as error:
            raise StagingError(
                f"The listing of '{source}/' is not JSON; is files_base_url right?"
            ) from error
        if not isinstance(page, list):
            raise StagingError(f"The listing of '{source}/' is not a list of files.")
        items.extend(page)
        if len(page) < LISTING_PAGE:
            return items


async def _download(
    client: httpx.AsyncClient, files: AppFiles, download: _Download, root: Path, target: Path
) -> int:
    """Stream one file to a temporary name beside ``target``, then rename it into place."""
    url = files.url(download.source)
    parent = target.parent
    await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
    # mkdir may have walked through something planted meanwhile; check again, resolved.
    await asyncio.to_thread(_inside, root, download.target, download.source)
    temp = parent / f".{target.name}.{uuid.uuid4().hex}.part"
    size = 0
    handle = None
    try:
        async with client.stream("GET", url) as response:
            if response.status_code == 404:
                raise StagingError(
                    f"'{download.source}' in files_to_stage is not among the app's files; "
                    f"{_FIX_HINT} (if it is a folder, end it with '/')."
                )
            if response.status_code >= 400:
                body = (await response.aread())[:200].decode("utf-8", "replace")
                raise StagingError(
                    f"Could not download '{download.source}' from the app's files: HTTP "
                    f"{response.status_code} {body}"
                )
            handle = await asyncio.to_thread(_open_new, temp)
            async for chunk in response.aiter_bytes(CHUNK_SIZE):
                await asyncio.to_thread(handle.write, chunk)
                size += len(chunk)
        await asyncio.to_thread(handle.close)
        handle = None
        await asyncio.to_thread(_replace, temp, target)
    except httpx.HTTPError as error:
        raise StagingError(
            f"Could not download '{download.source}' from the app's files: {error}. "
            "Check that the server is reachable and retry."
        ) from error
    except OSError as error:
        raise StagingError(
            f"Could not write '{download.target}' into the session folder: {error}."
        ) from error
    finally:
        if handle is not None:
            await asyncio.to_thread(handle.close)
        await asyncio.to_thread(_unlink_quietly, temp)
    return size


# ----------------------------------------------------------------------------- helpers
def _safe_name(name: object) -> bool:
    """A listing entry must be one plain path component."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(ch in name for ch in ("/", "\\", "\0"))
    )


def _resolved_dir(dest: Path) -> Path:
    root = dest.resolve(strict=True)
    if not root.is_dir():
        raise StagingError(f"The session folder {dest} is not a folder.")
    return root


def _inside(root: Path, relative: str, source: str) -> Path:
    """``root / relative``, resolved, or :class:`StagingError` if it leaves ``root``.

    Resolving follows any symlink already on the way, so a link pointing out of the
    session folder is caught here too. The last component stays unresolved: if it is a
    symlink, ``os.replace`` swaps the link itself and never writes through it.
    """
    candidate = root / relative
    parent = candidate.parent.resolve()
    final = parent / candidate.name
    if (
        os.path.isabs(relative)
        or candidate.name in ("", ".", "..")
        or not parent.is_relative_to(root)
        or final == root
    ):
        raise StagingError(
            f"Refusing to stage '{source}' to '{relative}': it would land outside the "
            "session folder. Rename the file in the app or remove it from files_to_stage."
        )
    return final


def _open_new(path: Path) -> BinaryIO:
    """Create ``path`` for writing; never follows or reuses an existing entry."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def _replace(temp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(f"'{target.name}' already exists as a folder")
    os.replace(temp, target)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


async def _all_or_nothing(coroutines: list[Awaitable[int]]) -> list[int]:
    """Run all; on the first failure cancel the rest (no orphan downloads) and re-raise."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class _Progress:
    """Counts finished files and reports per file, or about every 5% for big folders."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total = total
        self.finished = 0
        self.progress = progress
        self.every = 1 if total <= PER_FILE_PROGRESS_LIMIT else max(1, total // 20)

    async def done(self, target: str, size: int) -> None:
        self.finished += 1
        if self.every == 1:
            text = f"Staged {target} ({_human(size)}) [{self.finished}/{self.total}]"
        elif self.finished % self.every == 0 or self.finished == self.total:
            text = f"Staged {self.finished}/{self.total} files"
        else:
            return
        await self.progress(_message(text, self.finished / max(1, self.total)))


def _message(text: str, fraction: float, kind: str = "info") -> dict[str, Any]:
    return {"type": kind, "stage": "staging", "message": text, "progress": fraction}


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
