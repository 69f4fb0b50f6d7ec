"""``files_to_stage``: copy an app's files from Hypha's artifact manager into a session.

A manifest may list files and folders of the app that its code expects in its working
folder. They are fetched over Hypha's HTTP file API before the kernel starts:
``GET {files_base_url}/{path}`` downloads a file and ``GET {files_base_url}/{folder}/``
(trailing slash) lists a folder as JSON ``[{"name", "type": "file"|"directory", "size"},
...]``. Folders are listed, then their small files are fetched in a few zip requests
(staging_zip.py) rather than one request each; big files, single files named by the
manifest, and any batch the server will not zip come one request per file.

Everything that names a path on disk comes from outside: the rules from the manifest's
author, the names in a folder listing from whatever the artifact holds. So the rules are
validated before any work is done, every name in a listing is checked, and every final
path is resolved and must lie inside the session folder. Nothing is written through a
symlink and no symlink is created. Downloads stream to a temporary name in small chunks
written off the event loop (the worker may live inside the Hypha server, where a stall
stalls every user), then are renamed into place, so a half-written file never shows up
under its real name. What one start may list, count and write is bounded
(staging_limits.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hypha_conda_plugin.aio import gather_or_cancel
from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.errors import StagingError
from hypha_conda_plugin.stage_paths import (
    inside,
    open_new,
    replace,
    resolved_dir,
    safe_name,
    unlink_quietly,
)
from hypha_conda_plugin.stage_rules import StageRule
from hypha_conda_plugin.staging_limits import ByteBudget, StagingLimits
from hypha_conda_plugin.staging_zip import (
    ZIP_FILES_PER_PART,
    ZIP_MEMBER_LIMIT,
    ZIP_MIN_FILES,
    Member,
    ZipUnavailable,
    batches,
    stage_zip,
)

#: Downloads running at once; enough to hide per-request latency for many small files
#: without opening a flood of connections to the server.
DEFAULT_CONCURRENCY = 4
#: Bytes handed to the writer thread at a time (one thread hop per chunk).
CHUNK_SIZE = 256 * 1024
#: Items per listing request; the server's own default page size.
LISTING_PAGE = 1000
#: Bytes of one listing page we read at most (1,000 entries of S3's longest names fit).
LISTING_PAGE_MAX_BYTES = 4 * 1024**2
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
    size: int | None = None  # as the folder's listing gives it; None for single files


# ----------------------------------------------------------------------------- staging
async def stage_files(
    rules: Iterable[StageRule],
    *,
    dest: Path,
    files: AppFiles,
    progress: Progress,
    concurrency: int = DEFAULT_CONCURRENCY,
    limits: StagingLimits | None = None,
    use_zip: bool = True,
    zip_member_limit: int = ZIP_MEMBER_LIMIT,
) -> StagingReport:
    """Download the rules' files and folders into ``dest`` (an existing session folder).

    Folders are listed through the same HTTP API; their files smaller than
    ``zip_member_limit`` are fetched as zips (``use_zip=False`` fetches every file on
    its own, as servers without the zip endpoint need). Raises :class:`StagingError`
    naming the path when a file is missing, a download fails, a listing or zip names
    something that would land outside ``dest``, or a bound of ``limits`` is exceeded;
    the caller removes the session folder, so partial results never outlive a failed
    start, and no temporary file outlives this call.
    """
    rules = list(rules)
    limits = limits or StagingLimits()
    started = time.monotonic()
    root = await asyncio.to_thread(resolved_dir, dest)
    budget = ByteBudget(limits)
    # Zip batches and single downloads run side by side, up to `concurrency` each.
    async with files.client(max_connections=2 * max(1, concurrency) + 1) as client:
        lister = _Lister(client, files, limits)
        downloads: list[_Download] = []
        for rule in rules:
            if rule.is_dir:
                await progress(_message(f"Listing folder {rule.source}/ of the app's files", 0.0))
                found = await lister.folder(rule.source, rule.target)
                if not found:
                    raise StagingError(
                        f"The folder '{rule.source}/' in files_to_stage has no files; {_FIX_HINT}."
                    )
                downloads.extend(found)
            else:
                downloads.append(_Download(rule.source, rule.target))
            limits.check_files(len(downloads), f" (counted up to '{rule.source}')")
        # Check every destination and the known sizes before writing anything, so a
        # hostile listing or a bound fails the whole staging instead of after half of it.
        budget.check_more(
            sum(d.size or 0 for d in downloads), " (the sizes the app's folder listings give)"
        )
        targets = await asyncio.to_thread(
            lambda: [inside(root, d.target, d.source) for d in downloads]
        )
        _check_distinct(downloads, targets)
        total = len(downloads)
        await progress(_message(f"Staging {total} file(s) into the session folder", 0.0))
        counter = _Progress(total, progress)
        semaphore = asyncio.Semaphore(max(1, concurrency))

        async def fetch(download: _Download) -> int:
            async with semaphore:
                size = await _download(client, files, download, root, budget)
            await counter.done(download.target, size)
            return size

        zipped = [
            d for d in downloads if use_zip and d.size is not None and d.size <= zip_member_limit
        ]
        if len(zipped) < ZIP_MIN_FILES or files.zip_url is None:
            zipped = []
        chosen = set(map(id, zipped))
        jobs = [fetch(d) for d in downloads if id(d) not in chosen]
        if zipped:
            jobs.append(_zipped(client, files, zipped, root, budget, counter, fetch, concurrency))
        sizes = await gather_or_cancel(jobs)
    report = StagingReport(files=total, bytes=sum(sizes), seconds=time.monotonic() - started)
    await progress(
        _message(
            f"Staged {report.files} file(s), {_human(report.bytes)}, in {report.seconds:.1f} s",
            1.0,
            kind="success",
        )
    )
    return report


async def _zipped(
    client: httpx.AsyncClient,
    files: AppFiles,
    downloads: list[_Download],
    root: Path,
    budget: ByteBudget,
    counter: _Progress,
    fetch: Callable[[_Download], Awaitable[int]],
    concurrency: int,
) -> int:
    """Stage ``downloads`` in zip batches, up to ``concurrency`` at a time; once the
    server refuses to zip, every batch not yet staged goes one request per file."""
    zip_url = files.zip_url
    assert zip_url is not None
    by_source = {d.source: d for d in downloads}
    members = [Member(d.source, d.target, d.size or 0) for d in downloads]
    parts = min(max(1, concurrency), max(1, len(members) // ZIP_FILES_PER_PART))
    semaphore = asyncio.Semaphore(max(1, concurrency))
    refused: list[str] = []

    async def one(group: list[Member]) -> int:
        async with semaphore:
            if not refused:
                try:
                    written = await stage_zip(client, files, group, root, budget)
                except ZipUnavailable as reason:
                    first = not refused
                    refused.append(str(reason))
                    if first:
                        await counter.progress(
                            _message(
                                f"The server did not zip the app's files ({reason}); "
                                "fetching them one by one.",
                                counter.finished / max(1, counter.total),
                                kind="warning",
                            )
                        )
                else:
                    await counter.done_many(len(group))
                    return written
        return sum(await gather_or_cancel([fetch(by_source[m.source]) for m in group]))

    groups = batches(members, zip_url, parts)
    return sum(await gather_or_cancel([one(group) for group in groups]))


class _Lister:
    """Lists folders for one start, counting every entry against the start's bound."""

    def __init__(self, client: httpx.AsyncClient, files: AppFiles, limits: StagingLimits):
        self.client = client
        self.files = files
        self.limits = limits
        self.entries = 0
        self.found = 0  # files among the entries

    async def folder(self, source: str, target: str, depth: int = 0) -> list[_Download]:
        """Every file under ``source`` (recursively), paired with where it goes."""
        if depth > MAX_DEPTH:
            raise StagingError(
                f"The folder '{source}/' nests more than {MAX_DEPTH} levels deep; refusing "
                "to stage it. Flatten it or stage a smaller subfolder."
            )
        downloads: list[_Download] = []
        for item in await self._listing(source, first_level=depth == 0):
            name = item.get("name") if isinstance(item, dict) else None
            if not safe_name(name):
                raise StagingError(
                    f"The listing of '{source}/' names an unsafe entry {name!r}; refusing to "
                    "stage it because it could land outside the session folder. Rename the "
                    "file in the app or remove the folder from files_to_stage."
                )
            if item.get("type") == "directory":
                downloads.extend(
                    await self.folder(f"{source}/{name}", f"{target}/{name}", depth + 1)
                )
            else:
                size = item.get("size")
                known = size if isinstance(size, int) and size >= 0 else None
                downloads.append(_Download(f"{source}/{name}", f"{target}/{name}", known))
        return downloads

    async def _listing(self, source: str, *, first_level: bool) -> list[Any]:
        """All items of one folder, page by page (the server returns at most ``limit``)."""
        items: list[Any] = []
        url = self.files.url(source, folder=True)
        while True:
            status, body = await self._page(url, source, offset=len(items))
            if status == 404:
                if items:  # an offset past the end: the previous page was exactly full
                    return items
                if not first_level:  # listed by its parent a moment ago, now empty: skip
                    return items
                raise StagingError(
                    f"The folder '{source}/' in files_to_stage is not among the app's files; "
                    f"{_FIX_HINT} (if it is a single file, drop the trailing '/')."
                )
            if status >= 400:
                raise StagingError(
                    f"Could not list the folder '{source}/' of the app's files: HTTP "
                    f"{status} {body[:200].decode('utf-8', 'replace')}"
                )
            try:
                page = json.loads(body)
            except ValueError as error:
                raise StagingError(
                    f"The listing of '{source}/' is not JSON; is files_base_url right?"
                ) from error
            if not isinstance(page, list):
                raise StagingError(f"The listing of '{source}/' is not a list of files.")
            self.found += sum(isinstance(i, dict) and i.get("type") != "directory" for i in page)
            self.limits.check_files(self.found, f" (listing '{source}/')", at_least=True)
            self.entries += len(page)
            self.limits.check_listing(self.entries, source)
            items.extend(page)
            if len(page) < LISTING_PAGE:
                return items

    async def _page(self, url: str, source: str, offset: int) -> tuple[int, bytes]:
        """One listing page's status and body, read up to ``LISTING_PAGE_MAX_BYTES``."""
        body = bytearray()
        try:
            async with self.client.stream(
                "GET", url, params={"limit": LISTING_PAGE, "offset": offset}
            ) as response:
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > LISTING_PAGE_MAX_BYTES:
                        raise StagingError(
                            f"A listing page of '{source}/' is larger than "
                            f"{LISTING_PAGE_MAX_BYTES} bytes for {LISTING_PAGE} entries; "
                            "refusing it. Is files_base_url right?"
                        )
                return response.status_code, bytes(body)
        except httpx.HTTPError as error:
            raise StagingError(
                f"Could not list the folder '{source}/' of the app's files: {error}."
            ) from error


async def _download(
    client: httpx.AsyncClient,
    files: AppFiles,
    download: _Download,
    root: Path,
    budget: ByteBudget,
) -> int:
    """Stream one file to a temporary name beside its target, then rename it into place."""
    url = files.url(download.source)
    target = await asyncio.to_thread(inside, root, download.target, download.source)
    parent = target.parent
    await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
    # mkdir may have walked through something planted meanwhile; check again, resolved.
    await asyncio.to_thread(inside, root, download.target, download.source)
    temp = parent / f".{target.name}.{uuid.uuid4().hex}.part"
    what = f" (at '{download.target}')"
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
            declared = response.headers.get("content-length", "")
            if declared.isdigit():
                budget.check_more(int(declared), what)
            handle = await asyncio.to_thread(open_new, temp)
            async for chunk in response.aiter_bytes(CHUNK_SIZE):
                budget.add(len(chunk), what)
                await asyncio.to_thread(handle.write, chunk)
                size += len(chunk)
        await asyncio.to_thread(handle.close)
        handle = None
        await asyncio.to_thread(replace, temp, target)
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
        await asyncio.to_thread(unlink_quietly, temp)
    return size


# ----------------------------------------------------------------------------- helpers
def _check_distinct(downloads: list[_Download], targets: list[Path]) -> None:
    """Two files may not land on one path, nor a file where another needs a folder."""
    owner: dict[Path, str] = {}
    for download, target in zip(downloads, targets, strict=True):
        if target in owner:
            raise StagingError(
                f"'{owner[target]}' and '{download.source}' in files_to_stage would both be "
                f"staged to '{download.target}'; give each its own target."
            )
        owner[target] = download.source
    for download, target in zip(downloads, targets, strict=True):
        for parent in target.parents:
            if parent in owner:
                raise StagingError(
                    f"'{owner[parent]}' would be staged as a file where '{download.source}' "
                    "needs a folder; give them different targets in files_to_stage."
                )


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

    async def done_many(self, count: int) -> None:
        """A zip batch of ``count`` files is in place."""
        self.finished += count
        text = f"Staged {count} file(s) from one zip [{self.finished}/{self.total}]"
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
