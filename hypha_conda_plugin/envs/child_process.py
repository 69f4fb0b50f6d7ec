"""Running one build child (the rattler child, conda, mamba, pip) without ever choking.

Every build tool runs as a child in a process group of its own, so a time limit or a
cancelled request kills the tool and everything it started. Its output is read in
chunks, never with asyncio's line reader: ``StreamReader.readline`` gives up on a line
over 64 KiB with a bare ``ValueError``, and a drain that stops leaves the child blocked
on a full pipe until the time limit. A solver's explanation, or the result line of an
environment of 1,600 packages, is easily longer than that. Here a record (a line) may be
as long as ``max_record`` bytes (far beyond any real message, but still a bound), and
stderr keeps a tail bounded in lines and bytes for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from hypha_conda_plugin.sandbox import child_setup

READ_CHUNK = 64 * 1024
MAX_RECORD_BYTES = 64 * 1024 * 1024
MAX_STDOUT_BYTES = 64 * 1024 * 1024
TAIL_LINES = 200
TAIL_BYTES = 4 * 1024 * 1024
# How long output may keep flowing after the child itself exited (a grandchild holding
# the pipe) before the group is killed to close it.
EXIT_GRACE = 5.0

OnRecord = Callable[[bytes], Awaitable[None]]
#: Builds die with the worker and run below the server's CPU priority (a solve or an
#: install must not slow every Hypha user down).
_DIE_WITH_PARENT = child_setup(None, die_with_parent=True, niceness=10)


class ChildTimeout(Exception):
    """The child ran past its time limit and was killed with its process group."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"killed after {seconds:.0f} s")
        self.seconds = seconds


@dataclass(frozen=True)
class ChildResult:
    returncode: int
    stdout: bytes
    stdout_truncated: bool
    stderr_tail: str
    seconds: float


class RecordSplitter:
    """Cuts a byte stream into records at any of ``separators``, with no line limit.

    A record longer than ``max_record`` keeps its first ``max_record`` bytes and a note
    of how much was dropped; reading goes on either way.
    """

    def __init__(self, separators: bytes = b"\n", max_record: int = MAX_RECORD_BYTES) -> None:
        self._pattern = re.compile(b"[" + re.escape(separators) + b"]")
        self._max = max_record
        self._buffer = bytearray()
        self._dropped = 0

    def feed(self, data: bytes) -> list[bytes]:
        pieces = self._pattern.split(data)
        if len(pieces) == 1:
            self._append(data)
            return []
        self._append(pieces[0])
        records = [self._finish(bytes(self._buffer))]
        for piece in pieces[1:-1]:
            self._buffer, self._dropped = bytearray(), 0
            self._append(piece)
            records.append(self._finish(bytes(self._buffer)))
        self._buffer, self._dropped = bytearray(), 0
        self._append(pieces[-1])
        return records

    def flush(self) -> list[bytes]:
        if not self._buffer and not self._dropped:
            return []
        record = self._finish(bytes(self._buffer))
        self._buffer = bytearray()
        self._dropped = 0
        return [record]

    def _append(self, data: bytes) -> None:
        room = self._max - len(self._buffer)
        if room >= len(data):
            self._buffer += data
        else:
            self._buffer += data[: max(room, 0)]
            self._dropped += len(data) - max(room, 0)

    def _finish(self, record: bytes) -> bytes:
        if self._dropped:
            return record + f" [... {self._dropped} more bytes dropped]".encode()
        return record


class Tail:
    """The last lines of a stream, bounded in count and bytes.

    A single line longer than half the byte bound keeps its head (where tools put the
    error's name) and says how much was cut, so a huge explanation and the short
    verdict a tool prints after it both fit.
    """

    def __init__(self, max_lines: int = TAIL_LINES, max_bytes: int = TAIL_BYTES) -> None:
        self._lines: deque[str] = deque()
        self._size = 0
        self._max_lines = max_lines
        self._max_bytes = max_bytes

    def add(self, line: str) -> None:
        cap = self._max_bytes // 2
        if len(line) > cap:
            line = line[:cap] + f" [... {len(line) - cap} more]"
        self._lines.append(line)
        self._size += len(line)
        while len(self._lines) > 1 and (
            len(self._lines) > self._max_lines or self._size > self._max_bytes
        ):
            self._size -= len(self._lines.popleft())

    def text(self) -> str:
        return "\n".join(self._lines)


async def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    stdin: bytes | None = None,
    on_stdout: OnRecord | None = None,
    on_stderr: OnRecord | None = None,
    stdout_separators: bytes = b"\n",
    keep_stdout: bool = False,
    cwd: str | None = None,
) -> ChildResult:
    """Run ``argv`` to its end in a new session and return what it said.

    ``on_stdout`` / ``on_stderr`` get each record as it arrives. With ``keep_stdout`` the
    whole of stdout (up to ``MAX_STDOUT_BYTES``) is returned too, for tools that print
    one JSON document at the end. Raises ``ChildTimeout`` after ``timeout`` seconds and
    ``OSError`` when the program cannot be started. Whatever happens (time limit,
    cancellation, a failing callback), the child's whole process group is killed before
    this returns.
    """
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env=dict(env),
        cwd=cwd,
        # A build must not outlive a killed worker (it would go on writing into the
        # cache); its own process group is killed on time limits and cancellation.
        preexec_fn=_DIE_WITH_PARENT,
    )
    kept = bytearray()
    truncated = False
    tail = Tail()

    async def keep(record: bytes) -> None:
        nonlocal truncated
        if keep_stdout:
            room = MAX_STDOUT_BYTES - len(kept)
            if len(record) + 1 > room:
                truncated = True
            kept.extend((record + b"\n")[: max(room, 0)])
        if on_stdout is not None:
            await on_stdout(record)

    async def remember(record: bytes) -> None:
        tail.add(record.decode(errors="replace").rstrip())
        if on_stderr is not None:
            await on_stderr(record)

    try:
        await asyncio.wait_for(
            _communicate(
                process,
                stdin,
                (process.stdout, RecordSplitter(stdout_separators), keep),
                (process.stderr, RecordSplitter(b"\n"), remember),
            ),
            timeout,
        )
    except asyncio.TimeoutError:  # the builtin only from Python 3.11
        raise ChildTimeout(timeout) from None
    finally:
        await kill_group(process)
    return ChildResult(
        returncode=process.returncode if process.returncode is not None else -signal.SIGKILL,
        stdout=bytes(kept),
        stdout_truncated=truncated,
        stderr_tail=tail.text(),
        seconds=time.monotonic() - started,
    )


async def _communicate(
    process: asyncio.subprocess.Process,
    stdin: bytes | None,
    *streams: tuple[asyncio.StreamReader, RecordSplitter, OnRecord],
) -> None:
    readers = (_read(stream, splitter, sink) for stream, splitter, sink in streams)
    io = asyncio.gather(_feed(process, stdin), *readers)
    exited = asyncio.ensure_future(process.wait())
    try:
        done, _ = await asyncio.wait({io, exited}, return_when=asyncio.FIRST_COMPLETED)
        if io not in done:
            # The child is gone; give its output a moment, then close the pipes that
            # anything it left behind still holds by killing the group.
            finished, _ = await asyncio.wait({io}, timeout=EXIT_GRACE)
            if not finished:
                _signal_group(process.pid)
                await asyncio.wait({io}, timeout=EXIT_GRACE)
            if not io.done():
                io.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await io
        await exited
    finally:
        for task in (io, exited):
            task.cancel()
        await asyncio.gather(io, exited, return_exceptions=True)


async def _feed(process: asyncio.subprocess.Process, data: bytes | None) -> None:
    if data is None or process.stdin is None:
        return
    # A child that exits without reading its input is reported by its exit status.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        process.stdin.write(data)
        await process.stdin.drain()
        process.stdin.close()


async def _read(stream: asyncio.StreamReader, splitter: RecordSplitter, sink: OnRecord) -> None:
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            break
        for record in splitter.feed(chunk):
            await sink(record)
    for record in splitter.flush():
        await sink(record)


def _signal_group(pgid: int) -> None:
    """SIGKILL a process group this module created (``start_new_session``).

    Called right after the leader ends too, to take down what it started: a group's
    number cannot be handed to a new process while any member is alive, and once the
    group is empty the call fails harmlessly.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill the child's whole process group and reap the child."""
    _signal_group(process.pid)
    if process.returncode is None:
        with contextlib.suppress(Exception):
            await process.wait()
