"""Turn one cell's Jupyter messages into the result our clients are promised.

Clients of the worker do not speak the Jupyter messaging protocol; they get one plain
dict per executed cell, the same whether the kernel succeeded, raised, timed out or died::

    {
        "status": "ok" | "error",
        "outputs": [{"type": "stream" | "execute_result" | "display_data", ...}],
        "error": None | {"ename": str, "evalue": str, "traceback": [str, ...]},
        "execution_count": int | None,
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

A streaming client may also pass an output callback. It receives each item as it
arrives, plus two events the final ``outputs`` list has already applied:
``{"type": "update_display_data", "display_id", "data", "metadata"}`` and
``{"type": "clear_output"}``.

This module knows nothing about processes or sockets: :class:`CellOutputs` is fed
message dicts in the Jupyter messaging format, which keeps the contract testable
without a kernel. The kernel life cycle (and diagnosing timeouts and deaths) is in
:mod:`hypha_conda_plugin.kernel`, which imports this module, never the other way round.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hypha_conda_plugin.callbacks import notify

OutputCallback = Callable[[dict[str, Any]], Any]
"""Receives output items as they arrive; may be sync, async or a remote function."""

# CSI sequences (colors), OSC sequences (hyperlinks, titles) and two-byte escapes.
_ANSI_RE = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """Remove terminal escape codes: clients show tracebacks as plain text."""
    return _ANSI_RE.sub("", text)


def plain_traceback(frames: list[str]) -> list[str]:
    """IPython's traceback frames are colored multi-line strings; clients want lines."""
    return [line for frame in frames for line in strip_ansi(frame).splitlines()]


class CellOutputs:
    """Collects the IOPub messages of one execution into contract output items.

    One instance per cell. The kernel layer feeds it every IOPub message addressed to
    the cell (:meth:`handle`) and then asks for the result: from the shell reply
    (:meth:`from_reply`) or, when it had to diagnose the end itself (timeout, death),
    via :meth:`failure`, which keeps the output and traceback collected so far.
    """

    def __init__(self, callback: OutputCallback | None = None) -> None:
        self.callback = callback
        self.outputs: list[dict[str, Any]] = []
        self.error: dict[str, Any] | None = None
        self.execution_count: int | None = None
        self._clear_pending = False
        # Lets the kernel layer tell when a dying kernel's last messages stop coming.
        self.messages_seen = 0

    async def handle(self, msg: dict[str, Any]) -> None:
        """Dispatch one IOPub message; unknown types (status, comms) are ignored."""
        self.messages_seen += 1
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            await self._add({"type": "stream", "name": content["name"], "text": content["text"]})
        elif kind in ("execute_result", "display_data"):
            await self._add(self._rich_item(kind, content))
        elif kind == "update_display_data":
            await self._update_display(content)
        elif kind == "clear_output":
            await self._clear(wait=bool(content.get("wait")))
        elif kind == "error":
            self.error = self.error_from(content)
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count")

    @staticmethod
    def error_from(content: dict[str, Any]) -> dict[str, Any]:
        """The contract's error shape, with a plain-text traceback."""
        return {
            "ename": content.get("ename", "Error"),
            "evalue": content.get("evalue", ""),
            "traceback": plain_traceback(content.get("traceback") or []),
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

    async def _add(self, item: dict[str, Any]) -> None:
        """Append an item, merging consecutive chunks of one stream into one item."""
        await self._apply_pending_clear()
        last = self.outputs[-1] if self.outputs else None
        if (
            item["type"] == "stream"
            and last is not None
            and last["type"] == "stream"
            and last["name"] == item["name"]
        ):
            last["text"] += item["text"]
        else:
            self.outputs.append(dict(item))
        await notify(self.callback, item)

    async def _update_display(self, content: dict[str, Any]) -> None:
        """Update displays of this cell in place; one from an earlier cell becomes new output.

        The final result cannot reach back into an earlier cell's outputs, so showing
        the update as a fresh display is the most useful thing left to do.
        """
        display_id = (content.get("transient") or {}).get("display_id")
        matches = [o for o in self.outputs if display_id and o.get("display_id") == display_id]
        for item in matches:
            item["data"] = content.get("data", {})
            item["metadata"] = content.get("metadata", {})
        if not matches:
            await self._add(self._rich_item("display_data", content))
            return
        update = self._rich_item("display_data", content)
        update["type"] = "update_display_data"
        await notify(self.callback, update)

    async def _clear(self, *, wait: bool) -> None:
        """``clear_output(wait=True)`` clears only when the next output arrives (no flicker)."""
        self._clear_pending = True
        if not wait:
            await self._apply_pending_clear()

    async def _apply_pending_clear(self) -> None:
        if not self._clear_pending:
            return
        self._clear_pending = False
        self.outputs.clear()
        await notify(self.callback, {"type": "clear_output"})

    def result(self, status: str, error: dict[str, Any] | None) -> dict[str, Any]:
        """The contract's execute result."""
        return {
            "status": status,
            "outputs": self.outputs,
            "error": error,
            "execution_count": self.execution_count,
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
