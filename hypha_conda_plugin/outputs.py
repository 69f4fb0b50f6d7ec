"""Turn one cell's Jupyter messages into the result our clients are promised.

Clients of the worker do not speak the Jupyter messaging protocol; they get one plain
dict per executed cell, the same whether the kernel succeeded, raised, timed out or died::

    {
        "status": "ok" | "error",
        "outputs": [{"type": "stream" | "execute_result" | "display_data", ...}],
        "error": None | {"ename": str, "evalue": str, "traceback": [str, ...]},
        "execution_count": int | None,
        "outputs_truncated": bool,
    }

Output items, in the order the kernel produced them:

- ``{"type": "stream", "name": "stdout" | "stderr", "text": str}``; consecutive chunks of
  one stream are merged into one item, a switch of stream starts a new item.
- ``{"type": "execute_result", "data", "metadata", "execution_count"}``.
- ``{"type": "display_data", "data", "metadata"}`` plus ``"display_id"`` when the display
  can be updated later; an update rewrites that item in place.

The error lives only in ``"error"`` (never in ``outputs``), and its traceback is plain
text lines: IPython's frames are colored multi-line strings that only a terminal shows
well.

**The output cap.** The worker lives in the Hypha server's process, so a cell that
prints without end must not be able to fill its memory. Everything a cell outputs is
counted as the text it adds to the result (stream text, rich data and metadata as
JSON, a little for each item's own keys), updates and cleared output included. Past
``max_bytes`` further output is dropped as it arrives, ``outputs_truncated`` is true,
and the last item is a stderr stream saying how much was dropped. The kernel is not
stopped: the cell runs to its end (or its time limit). The kernel bootstrap
(:mod:`hypha_conda_plugin.kernel_bootstrap`) applies the same cap to printed text
inside the kernel and reports what it dropped there, so a flood never even crosses the
socket; this module does not rely on it (user code can undo anything in its kernel).

A streaming client may also pass an output callback. It receives each item as it
arrives, plus two events the final ``outputs`` list has already applied:
``{"type": "update_display_data", "display_id", "data", "metadata"}`` and
``{"type": "clear_output"}``. Dropped output reaches it no more than the result.

This module knows nothing about processes or sockets: :class:`CellOutputs` is fed
message dicts in the Jupyter messaging format, which keeps the contract testable
without a kernel. The kernel life cycle (and diagnosing timeouts and deaths) is in
:mod:`hypha_conda_plugin.kernel`, which imports this module, never the other way round.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

OutputSink = Callable[[dict[str, Any]], None]
"""Receives output items as they arrive, synchronously: the kernel's reader calls it
between two messages, so it must return at once. The worker's sink records the item in
the session log and queues it for the client's callback
(:class:`hypha_conda_plugin.callbacks.CallbackQueue`), which is delivered by a task of
its own: a slow client never holds the reader or counts against the cell's time."""

OutputCallback = OutputSink  # the name kernel.py imports

#: The default cap of a cell's output (``CONDA_MAX_OUTPUT_BYTES``).
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
#: IOPub message type the kernel bootstrap sends with the text it dropped at the source.
DROPPED_AT_SOURCE = "hypha_conda_output_dropped"
#: What an output item adds to the result besides its text (its keys, as JSON).
ITEM_OVERHEAD = 64
#: An error's traceback and value are shortened in the middle beyond these sizes.
MAX_TRACEBACK_BYTES = 256 * 1024
MAX_EVALUE_BYTES = 64 * 1024
MAX_ENAME_BYTES = 1024
#: The reader yields to the event loop after this many messages, so a kernel that
#: floods its socket cannot starve the other users of the server's loop.
YIELD_EVERY = 32

# CSI sequences (colors), OSC sequences (hyperlinks, titles) and two-byte escapes.
_ANSI_RE = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove terminal escape codes: clients show tracebacks as plain text."""
    return _ANSI_RE.sub("", text)


def plain_traceback(frames: list[str]) -> list[str]:
    """IPython's traceback frames are colored multi-line strings; clients want lines."""
    return [line for frame in frames for line in strip_ansi(str(frame)).splitlines()]


def text_size(text: str) -> int:
    """UTF-8 size of ``text``, without copying it when it is ASCII (the common case)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def clip_text(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 size is at most ``max_bytes``."""
    if max_bytes <= 0:
        return ""
    if text.isascii():
        return text[:max_bytes]
    if len(text) * 4 <= max_bytes:
        return text
    return text.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def json_size(value: object) -> int:
    """About how many bytes ``value`` takes as JSON, without serializing it.

    Iterative, so a deeply nested (hostile) value cannot exhaust the stack.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += text_size(item) + 2
        elif isinstance(item, dict):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, bytes | bytearray):
            total += len(item) * 4 // 3 + 4
        else:
            total += 8
    return total


def _format_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def _clip_lines(lines: list[str], budget: int) -> list[str]:
    """Keep the head and the tail of ``lines`` within ``budget`` bytes (tracebacks: the
    first frames say where it started, the last ones what failed)."""
    sizes = [text_size(line) + 1 for line in lines]
    if sum(sizes) <= budget:
        return lines
    head: list[str] = []
    tail: list[str] = []
    used, first, last = 0, 0, len(lines) - 1
    while first <= last:
        take_head = len(head) <= len(tail)
        index = first if take_head else last
        if used + sizes[index] > budget:
            if not head and not tail:  # one enormous line: keep its beginning
                head.append(clip_text(lines[index], budget))
                first += 1
            break
        used += sizes[index]
        if take_head:
            head.append(lines[first])
            first += 1
        else:
            tail.append(lines[last])
            last -= 1
    omitted = last - first + 1
    middle = [f"... ({omitted} lines omitted: the traceback was too long) ..."] if omitted else []
    return head + middle + tail[::-1]


class CellOutputs:
    """Collects the IOPub messages of one execution into contract output items.

    One instance per cell. The kernel layer feeds it every IOPub message addressed to
    the cell (:meth:`handle`) and then asks for the result: from the shell reply
    (:meth:`from_reply`) or, when it had to diagnose the end itself (timeout, death),
    via :meth:`failure`, which keeps the output and traceback collected so far.

    ``max_bytes`` caps the cell's output (None: no cap); see the module docstring.
    Stream chunks are kept in a list and joined once when the result is read, so a
    cell printing many small chunks costs linear, not quadratic, time.
    """

    def __init__(self, callback: OutputSink | None = None, *, max_bytes: int | None = None) -> None:
        self.callback = callback
        self.max_bytes = max_bytes
        self.error: dict[str, Any] | None = None
        self.execution_count: int | None = None
        # Output bytes counted against the cap, and what was dropped beyond it.
        self.used_bytes = 0
        self.dropped_bytes = 0
        self.dropped_messages = 0
        self.dropped_at_source = 0  # reported by the kernel bootstrap
        self._cut = False  # this side's cap was reached: nothing more is kept
        self._items: list[dict[str, Any]] = []
        # The last item when it is a stream still being appended to, and its chunks.
        self._open_stream: tuple[dict[str, Any], list[str]] | None = None
        self._clear_pending = False
        self._noticed = False
        self._sink_warned = False
        # Lets the kernel layer tell when a dying kernel's last messages stop coming.
        self.messages_seen = 0

    @property
    def truncated(self) -> bool:
        """Whether any output was dropped, here or in the kernel."""
        return self._cut or self.dropped_at_source > 0

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """The output items so far (stream chunks joined)."""
        self._join_stream()
        return self._items

    async def handle(self, msg: dict[str, Any]) -> None:
        """Dispatch one IOPub message; unknown types (status, comms) are ignored."""
        self.messages_seen += 1
        kind, content = msg.get("msg_type"), msg.get("content") or {}
        if kind == "stream":
            self._stream(str(content.get("name", "stdout")), str(content.get("text", "")))
        elif kind in ("execute_result", "display_data"):
            self._rich(self._rich_item(kind, content))
        elif kind == "update_display_data":
            self._update_display(content)
        elif kind == "clear_output":
            self._clear(wait=bool(content.get("wait")))
        elif kind == "error":
            self.error = self.error_from(content)
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count")
        elif kind == DROPPED_AT_SOURCE:
            self._dropped_at_source(content)
        if self.messages_seen % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    @staticmethod
    def error_from(content: dict[str, Any]) -> dict[str, Any]:
        """The contract's error shape, with a plain-text traceback of bounded size."""
        return {
            "ename": clip_text(str(content.get("ename", "Error")), MAX_ENAME_BYTES),
            "evalue": clip_text(str(content.get("evalue", "")), MAX_EVALUE_BYTES),
            "traceback": _clip_lines(
                plain_traceback(content.get("traceback") or []), MAX_TRACEBACK_BYTES
            ),
        }

    @staticmethod
    def _rich_item(kind: str, content: dict[str, Any]) -> dict[str, Any]:
        """Keep the display id (when there is one) so a streaming client can apply updates."""
        item: dict[str, Any] = {
            "type": kind,
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
        }
        if kind == "execute_result":
            item["execution_count"] = content.get("execution_count")
        display_id = (content.get("transient") or {}).get("display_id")
        if display_id is not None:
            item["display_id"] = display_id
        return item

    # ------------------------------------------------------------------ the cap

    def _admit(self, size: int) -> bool:
        """Count ``size`` bytes against the cap; False (and counted as dropped) past it."""
        if not self._cut and (self.max_bytes is None or self.used_bytes + size <= self.max_bytes):
            self.used_bytes += size
            return True
        self._drop(size)
        return False

    def mark_lost(self) -> None:
        """Output was lost on the way (the kernel sent a message over the size limit and
        ZeroMQ dropped the connection with it): say so, as for output past the cap."""
        self._cut = True
        self.dropped_messages += 1

    def _drop(self, size: int) -> None:
        self._cut = True
        self.dropped_bytes += size
        self.dropped_messages += 1

    def _dropped_at_source(self, content: dict[str, Any]) -> None:
        """The kernel bootstrap dropped printed text past the cap before sending it.

        Only counted: the report may overtake the kernel's last stream message, which
        must still be admitted (or cut) by this side's own count.
        """
        size = content.get("bytes")
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            self.dropped_at_source = min(self.dropped_at_source + size, 1 << 62)

    # ------------------------------------------------------------ output items

    def _stream(self, name: str, text: str) -> None:
        """Append a chunk, merging consecutive chunks of one stream into one item."""
        self._apply_pending_clear()
        opening = self._open_stream is None or self._open_stream[0]["name"] != name
        overhead = ITEM_OVERHEAD if opening else 0
        was_cut = self._cut
        if not self._admit(text_size(text) + overhead):
            if was_cut or self.max_bytes is None:
                return
            # The chunk that crossed the cap: keep what still fits of it.
            text = clip_text(text, self.max_bytes - self.used_bytes - overhead)
            if not text:
                return
            kept = text_size(text)
            self.dropped_bytes -= kept
            self.used_bytes += kept + overhead
        if opening:
            self._close_stream()
            item = {"type": "stream", "name": name, "text": ""}
            self._items.append(item)
            self._open_stream = (item, [])
        assert self._open_stream is not None
        self._open_stream[1].append(text)
        self._emit({"type": "stream", "name": name, "text": text})

    def _rich(self, item: dict[str, Any]) -> None:
        self._apply_pending_clear()
        if not self._admit(self._rich_size(item)):
            return
        self._close_stream()
        self._items.append(dict(item))
        self._emit(item)

    @staticmethod
    def _rich_size(item: dict[str, Any]) -> int:
        return ITEM_OVERHEAD + json_size(item.get("data")) + json_size(item.get("metadata"))

    def _update_display(self, content: dict[str, Any]) -> None:
        """Update displays of this cell in place; one from an earlier cell becomes new output.

        The final result cannot reach back into an earlier cell's outputs, so showing
        the update as a fresh display is the most useful thing left to do. An update
        counts against the cap in full: it is new output the worker has to carry.
        """
        display_id = (content.get("transient") or {}).get("display_id")
        matches = [o for o in self._items if display_id and o.get("display_id") == display_id]
        if not matches:
            self._rich(self._rich_item("display_data", content))
            return
        update = self._rich_item("display_data", content)
        update["type"] = "update_display_data"
        if not self._admit(self._rich_size(update)):
            return
        for item in matches:
            item["data"] = update["data"]
            item["metadata"] = update["metadata"]
        self._emit(update)

    def _clear(self, *, wait: bool) -> None:
        """``clear_output(wait=True)`` clears only when the next output arrives (no flicker)."""
        if self._cut:
            return  # nothing of what follows is kept, so there is nothing to clear for
        self._clear_pending = True
        if not wait:
            self._apply_pending_clear()

    def _apply_pending_clear(self) -> None:
        if not self._clear_pending or self._cut:
            return
        self._clear_pending = False
        self._items.clear()
        self._open_stream = None
        self._emit({"type": "clear_output"})

    def _close_stream(self) -> None:
        """The open stream item is complete: a new item follows it."""
        self._join_stream()
        self._open_stream = None

    def _join_stream(self) -> None:
        """Give the open stream item its text (joined once, however many chunks)."""
        if self._open_stream is not None:
            item, chunks = self._open_stream
            if len(chunks) > 1:
                chunks[:] = ["".join(chunks)]
            item["text"] = chunks[0] if chunks else ""

    def _emit(self, item: dict[str, Any]) -> None:
        """Hand an item to the sink; a failing sink never breaks the cell."""
        if self.callback is None:
            return
        try:
            result = self.callback(item)
        except Exception as error:
            if not self._sink_warned:
                self._sink_warned = True
                logger.warning("Output sink failed for a %s item: %s", item.get("type"), error)
            return
        if inspect.isawaitable(result):
            # A coroutine would have to be awaited here, in the reader: exactly what must
            # not happen. Queue through callbacks.CallbackQueue instead.
            if inspect.iscoroutine(result):
                result.close()
            if not self._sink_warned:
                self._sink_warned = True
                logger.error("Output sinks must be synchronous; %r returned an awaitable", result)

    def _notice(self) -> None:
        """Say in the output itself that output was dropped (once, at the end)."""
        if not self.truncated or self._noticed:
            return
        self._noticed = True
        limit = _format_size(self.max_bytes) if self.max_bytes is not None else "its limit"
        text = (
            f"\n[Output truncated: this cell's output passed {limit} "
            f"(CONDA_MAX_OUTPUT_BYTES); "
            f"{_format_size(self.dropped_bytes + self.dropped_at_source)} more were "
            "dropped. The cell kept running; write large output to a file instead.]\n"
        )
        if self._open_stream is not None and self._open_stream[0]["name"] == "stderr":
            self._open_stream[1].append(text)
        else:
            self._close_stream()
            item = {"type": "stream", "name": "stderr", "text": ""}
            self._items.append(item)
            self._open_stream = (item, [text])
        self._emit({"type": "stream", "name": "stderr", "text": text})

    # ------------------------------------------------------------------ result

    def result(self, status: str, error: dict[str, Any] | None) -> dict[str, Any]:
        """The contract's execute result."""
        self._notice()
        return {
            "status": status,
            "outputs": self.outputs,
            "error": error,
            "execution_count": self.execution_count,
            "outputs_truncated": self.truncated,
        }

    def from_reply(self, reply: dict[str, Any]) -> dict[str, Any]:
        """Build the result from the shell reply; the IOPub error is preferred (same data)."""
        if reply.get("execution_count") is not None:
            self.execution_count = reply["execution_count"]
        status = reply.get("status", "error")
        if status == "ok":
            return self.result("ok", None)
        if status == "aborted":
            aborted = {
                "ename": "ExecutionAborted",
                "evalue": "The cell was aborted.",
                "traceback": [],
            }
            return self.result("error", self.error or aborted)
        return self.result("error", self.error or self.error_from(reply))

    def failure(self, ename: str, evalue: str) -> dict[str, Any]:
        """An error we diagnosed ourselves; keeps the traceback the kernel sent, if any."""
        traceback = self.error["traceback"] if self.error else []
        return self.result("error", {"ename": ename, "evalue": evalue, "traceback": traceback})
