"""Many staged files in one request: Hypha's ``create-zip-file`` endpoint, extracted safely.

``GET {ws}/artifacts/{alias}/create-zip-file?file=a&file=b&version=...`` streams a zip
(entries stored uncompressed, named by the requested paths) of the chosen files. One
request replaces one request per file: the per-request work of the server (login,
database session, permission check) is paid once per batch instead of once per file.

What Hypha 0.21.137 does, read from ``hypha/artifact.py`` (and what follows here):

* It takes files only, no folders (a folder's path is a missing object): folders are
  listed first and their files requested by name.
* It checks every file (S3 ``HEAD``) before the first byte and answers HTTP 500 when one
  is missing, without saying which; it ignores ``stage=true`` (the staged files are
  ``version=stage``). Any refusal sends the batch down the one-file-per-request path,
  which names a missing file exactly.
* It holds each member whole in memory while zipping (stream_zip's ``NO_COMPRESSION_32``
  computes the CRC before the header) and cannot zip a file of 4 GiB or more: only
  small files with a size known from a listing go into zips (``ZIP_MEMBER_LIMIT``).
* The file list travels in the URL, so batches are cut by URL length (``ZIP_URL_LIMIT``).
* It builds a zip one member after the other (a HEAD, a new S3 client and a GET each,
  with thread hops per chunk), so a big set is split into a few zips fetched side by
  side, as the per-file path overlaps its requests.

The zip is treated as hostile: it is streamed to a temporary file in the session folder
(never held in memory, bounded by the bytes still allowed), then, in a thread, every
entry is checked before anything is extracted: only the requested names, no absolute
path, no ``..``, no link, device or folder entry, no encryption, and declared sizes
within the budget. Extraction counts the bytes it actually writes and stops at the first
byte beyond an entry's declared size. The temporary zip never outlives the batch.
"""

from __future__ import annotations

import asyncio
import math
import re
import stat
import threading
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.errors import StagingError
from hypha_conda_plugin.stage_paths import inside, open_new, unlink_quietly
from hypha_conda_plugin.staging_limits import ByteBudget

#: Longest zip request URL; nginx's default header buffer is 8 KiB and uvicorn's h11
#: refuses request heads over 16 KiB.
ZIP_URL_LIMIT = 8000
#: Largest file put into a zip: the server holds each member whole in memory.
ZIP_MEMBER_LIMIT = 16 * 1024**2
#: Fewer files than this are fetched one by one (a zip of one file saves nothing).
ZIP_MIN_FILES = 2
#: Files per zip below which a set is not split further to run zips side by side.
ZIP_FILES_PER_PART = 100
#: Bytes handed to the writer thread at a time.
CHUNK_SIZE = 256 * 1024
#: A zip's own bytes besides the files: 22 for the end record, and per entry about 94
#: plus twice the name (Hypha's ``_calculate_zip_size``); room for extra fields too.
_ZIP_END_BYTES = 1024
_ZIP_ENTRY_BYTES = 256

_DRIVE = re.compile(r"^[A-Za-z]:")


class ZipUnavailable(Exception):
    """The server did not answer with a zip (missing endpoint, refusal, older server):
    fetch this batch's files one by one instead."""


@dataclass(frozen=True)
class Member:
    """One file to take from a zip: its path in the app's files and in the session."""

    source: str
    target: str
    size: int


def batches(members: Sequence[Member], zip_url: str, parts: int = 1) -> list[list[Member]]:
    """Split ``members`` into at least ``parts`` batches of similar size, cut further so
    that every request URL stays under ``ZIP_URL_LIMIT``."""
    per_batch = max(1, math.ceil(len(members) / max(1, parts)))
    result: list[list[Member]] = []
    current: list[Member] = []
    length = len(zip_url) + 64  # '?', the version and proxy parameters
    for member in members:
        extra = len("&file=") + len(quote(member.source, safe=""))
        if current and (length + extra > ZIP_URL_LIMIT or len(current) >= per_batch):
            result.append(current)
            current, length = [], len(zip_url) + 64
        current.append(member)
        length += extra
    if current:
        result.append(current)
    return result


async def stage_zip(
    client: httpx.AsyncClient,
    files: AppFiles,
    members: Sequence[Member],
    root: Path,
    budget: ByteBudget,
) -> int:
    """Fetch ``members`` as one zip and extract them into ``root``; returns the bytes
    written. Raises :class:`ZipUnavailable` (nothing written) when the server does not
    zip, :class:`StagingError` when the zip is unsafe, incomplete or over a bound."""
    zip_url = files.zip_url
    if zip_url is None:
        raise ZipUnavailable("the app's files URL has no create-zip-file endpoint")
    # As params, not in the URL: httpx replaces a URL's query with the client's params.
    query = [("file", m.source) for m in members] + list(files.zip_params.items())
    allowed = (
        budget.remaining
        + _ZIP_END_BYTES
        + sum(_ZIP_ENTRY_BYTES + 2 * len(m.source.encode()) for m in members)
    )
    temp = root / f".hypha-staging-{uuid.uuid4().hex}.zip"
    try:
        await _download(client, zip_url, query, temp, allowed, budget, len(members))
        stop = threading.Event()
        work = asyncio.ensure_future(
            asyncio.to_thread(_extract, temp, {m.source: m for m in members}, root, budget, stop)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # The thread cannot be killed: tell it to stop and wait, so nothing is
            # written into the session folder after the caller has cleaned it up.
            stop.set()
            await asyncio.gather(work, return_exceptions=True)
            raise
    finally:
        await asyncio.to_thread(unlink_quietly, temp)


async def _download(
    client: httpx.AsyncClient,
    url: str,
    query: list[tuple[str, str]],
    temp: Path,
    allowed: int,
    budget: ByteBudget,
    count: int,
) -> None:
    """Stream the zip to ``temp`` in chunks written off the event loop."""
    what = f" (a zip of {count} files)"
    try:
        async with client.stream("GET", url, params=query) as response:
            if response.status_code >= 400:
                body = (await _start_of(response)).decode("utf-8", "replace")
                raise ZipUnavailable(f"HTTP {response.status_code} {body}".strip())
            kind = response.headers.get("content-type", "")
            if "zip" not in kind:
                raise ZipUnavailable(f"the server answered {kind or 'no type'!r}, not a zip")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > allowed:
                raise budget.limits.bytes_error(budget.used + int(declared), what)
            size = 0
            handle = await asyncio.to_thread(open_new, temp)
            try:
                async for chunk in response.aiter_bytes(CHUNK_SIZE):
                    size += len(chunk)
                    if size > allowed:
                        raise budget.limits.bytes_error(budget.used + size, what, at_least=True)
                    await asyncio.to_thread(handle.write, chunk)
            finally:
                await asyncio.to_thread(handle.close)
    except httpx.HTTPError as error:
        raise ZipUnavailable(f"{type(error).__name__}: {error}") from error


async def _start_of(response: httpx.Response, limit: int = 300) -> bytes:
    """At most ``limit`` bytes of an error body (never the whole of a hostile one)."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= limit:
            break
    return head[:limit]


# ----------------------------------------------------------------------------- extraction
def _extract(
    path: Path, members: dict[str, Member], root: Path, budget: ByteBudget, stop: threading.Event
) -> int:
    """Check every entry, then extract them; runs in a thread."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ZipUnavailable(f"the answer is not a readable zip ({error})") from error
    with archive:
        entries = archive.infolist()
        _check_entries(entries, members)
        budget.check_more(
            sum(e.file_size for e in entries), " (the sizes declared in the app's zip)"
        )
        written = 0
        for entry in entries:
            if stop.is_set():
                raise StagingError("Staging was cancelled.")
            member = members[entry.filename]
            written += _write_entry(archive, entry, member, root, budget, stop)
        return written


def _check_entries(entries: Iterable[zipfile.ZipInfo], members: dict[str, Member]) -> None:
    seen: set[str] = set()
    for entry in entries:
        problem = _entry_problem(entry, members, seen)
        if problem:
            raise StagingError(
                f"The zip of the app's files has an unsafe entry {entry.filename!r} "
                f"({problem}); refusing to stage any of it. The server or the app's files "
                "are not what files_to_stage expects."
            )
        seen.add(entry.filename)
    missing = [source for source in members if source not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise StagingError(
            f"'{missing[0]}'{more} in files_to_stage is not among the app's files; add it "
            "to the app's files or remove it from files_to_stage."
        )


def _entry_problem(entry: zipfile.ZipInfo, members: dict[str, Member], seen: set[str]) -> str:
    """Why an entry may not be extracted, or '' when it may."""
    name = entry.filename
    parts = name.split("/")
    if name.startswith("/") or _DRIVE.match(name):
        return "an absolute path"
    if "\\" in name or "\0" in name:
        return "a backslash or NUL in its name"
    if ".." in parts:
        return "a '..' in its path"
    mode = entry.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if entry.is_dir() or stat.S_ISDIR(mode):
        return "a folder entry"
    if kind not in (0, stat.S_IFREG):
        return "a device, pipe or socket"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' part in its path"
    if entry.flag_bits & 0x1:
        return "encrypted"
    if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"compression method {entry.compress_type}"
    if name not in members:
        return "a file that was not asked for"
    if name in seen:
        return "a second entry with the same name"
    return ""


def _write_entry(
    archive: zipfile.ZipFile,
    entry: zipfile.ZipInfo,
    member: Member,
    root: Path,
    budget: ByteBudget,
    stop: threading.Event,
) -> int:
    """Copy one entry to its target, counting every byte against its declared size."""
    target = inside(root, member.target, member.source)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # mkdir may have walked through something planted meanwhile; check again.
        target = inside(root, member.target, member.source)
        handle = open_new(target)
    except FileExistsError as error:
        raise StagingError(
            f"'{member.target}' is staged twice (the second time from '{member.source}'); "
            "give each file of files_to_stage its own target."
        ) from error
    except OSError as error:
        raise StagingError(
            f"Could not write '{member.target}' into the session folder: {error}."
        ) from error
    size = 0
    try:
        with handle, archive.open(entry) as source:
            while chunk := source.read(CHUNK_SIZE):
                if stop.is_set():
                    raise StagingError("Staging was cancelled.")
                size += len(chunk)
                if size > entry.file_size:
                    break
                budget.add(len(chunk), f" (at '{member.target}')")
                handle.write(chunk)
        if size != entry.file_size:
            raise StagingError(
                f"The zip entry '{member.source}' declares {entry.file_size} bytes but holds "
                f"{'more' if size > entry.file_size else size}; refusing it."
            )
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        unlink_quietly(target)
        raise StagingError(
            f"The zip entry '{member.source}' is corrupt ({error}); refusing it."
        ) from error
    except BaseException:
        unlink_quietly(target)
        raise
    return size
