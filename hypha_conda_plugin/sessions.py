"""Session state, per-session logs and the registry of live sessions.

A session belongs to the workspace that started it: the registry is keyed by
``(workspace, session_id)``, so the same id in two workspaces names two sessions and a
lookup can only ever find the caller's own. Its folders are those of the instance
(:mod:`hypha_conda_plugin.instances`) its kernel runs in, assigned once it has one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_conda_plugin.callbacks import DRAIN_TIMEOUT, Callback, CallbackQueue
from hypha_conda_plugin.errors import SessionExistsError, SessionNotFoundError
from hypha_conda_plugin.outputs import clip_text, text_size

if TYPE_CHECKING:
    from hypha_conda_plugin.envs.cache import EnvLease
    from hypha_conda_plugin.instances import Instance
    from hypha_conda_plugin.kernel import Kernel

LOG_TYPES = ("stdout", "stderr", "info", "error", "progress")
#: One log entry keeps at most this much of its text (the log is for diagnosis; a
#: cell's full output is in its result).
MAX_LOG_ENTRY_BYTES = 64 * 1024
#: Per entry besides its text (its dict, the type and time), for the byte budget.
LOG_ENTRY_OVERHEAD = 100
DEFAULT_MAX_LOG_BYTES = 1024 * 1024
#: Ended sessions (failed, or stopped by the worker) are kept so their logs can explain
#: why; this many at most.
MAX_FAILED_KEPT = 20


class SessionState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class SessionLog:
    """Bounded log of one session: at most ``limit`` entries and ``max_bytes`` of text.

    Oldest entries go first once either bound is reached, and one entry keeps at most
    :data:`MAX_LOG_ENTRY_BYTES` of its text, so however much a session prints, its log
    costs the server a fixed amount of memory.
    """

    def __init__(self, limit: int, max_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self._items: deque[tuple[dict[str, Any], int]] = deque()
        self.bytes = 0
        self.dropped = 0

    def add(self, kind: str, content: str) -> None:
        content = _clip_entry(str(content), min(MAX_LOG_ENTRY_BYTES, self.max_bytes // 4))
        size = text_size(content) + LOG_ENTRY_OVERHEAD
        self._items.append(({"type": kind, "content": content, "time": time.time()}, size))
        self.bytes += size
        while len(self._items) > self.limit or (self.bytes > self.max_bytes and self._items):
            _, old = self._items.popleft()
            self.bytes -= old
            self.dropped += 1

    def query(self, kind: str | None = None, offset: int = 0, limit: int | None = None) -> dict:
        items = [item for item, _ in self._items if kind is None or item["type"] == kind]
        total = len(items)
        offset = max(0, offset)
        window = items[offset:] if limit is None else items[offset : offset + max(0, limit)]
        return {"items": window, "total": total, "offset": offset, "limit": limit}


def _clip_entry(content: str, max_bytes: int) -> str:
    """Keep the beginning of a long entry and say how much was cut."""
    size = text_size(content)
    if size <= max_bytes:
        return content
    kept = clip_text(content, max_bytes - 80)
    return f"{kept}\n[... {size - text_size(kept)} more bytes not kept in the log]"


@dataclass
class Session:
    id: str
    workspace: str
    log: SessionLog
    app_id: str | None = None
    instance: Instance | None = None
    isolation: str | None = None
    state: SessionState = SessionState.STARTING
    created_at: float = field(default_factory=time.time)
    env: EnvLease | None = None
    kernel: Kernel | None = None
    error: str | None = None
    executions: int = 0
    running: int = 0
    start_task: asyncio.Task | None = None
    #: The app's entry point code, between reading it and running it at start.
    entry_code: str | None = None
    #: Started by the server's app controller (whose own life cycle governs it).
    from_server: bool = False
    #: ``time.monotonic()`` of the start or the last execute, for the idle timeout.
    last_activity: float = field(default_factory=time.monotonic)

    @property
    def ended(self) -> bool:
        """A record kept for its logs only (it failed, or the worker stopped it)."""
        return self.state in (SessionState.FAILED, SessionState.STOPPED)

    @property
    def workdir(self) -> Path | None:
        """The session's working folder (cwd of its kernel), once it has an instance."""
        return self.instance.work if self.instance is not None else None

    deliveries: set[CallbackQueue] = field(default_factory=set)

    def record_output(self, item: dict[str, Any]) -> None:
        """Keep a cell's printed text in the session log (rich outputs stay in results)."""
        if item.get("type") == "stream":
            name = item.get("name")
            self.log.add(name if name in ("stdout", "stderr") else "stdout", item.get("text", ""))

    def deliver_to(self, callback: Callback | None, what: str) -> CallbackQueue:
        """A queue feeding a client's callback, ended with the session at the latest."""
        queue = CallbackQueue(callback, what=what)
        if queue.active:
            self.deliveries.add(queue)
        return queue

    async def finish_delivery(self, queue: CallbackQueue, grace: float = DRAIN_TIMEOUT) -> None:
        """Give ``queue`` up to ``grace`` seconds to deliver the rest; log what was lost."""
        try:
            report = await queue.aclose(grace)
        finally:
            self.deliveries.discard(queue)
        if report.lost:
            self.log.add(
                "info",
                f"The {queue.what} was too slow or failed: {report.lost} of "
                f"{report.lost + report.delivered} messages did not reach it "
                f"({report.dropped} dropped, {report.failed} failed or timed out). "
                "Nothing else was affected.",
            )

    def cancel_deliveries(self) -> None:
        """The session ended: stop feeding its callbacks."""
        for queue in list(self.deliveries):
            queue.cancel()
        self.deliveries.clear()

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "workspace": self.workspace,
            "app_id": self.app_id,
            "status": self.state.value,
            "created_at": self.created_at,
            "working_dir": str(self.workdir) if self.workdir else None,
            "isolation": self.isolation,
            "environment": str(self.env.prefix) if self.env else None,
            "environment_key": self.env.key if self.env else None,
            "environment_reused": self.env.reused if self.env else None,
            "executions": self.executions,
            "kernel_pid": self.kernel.pid if self.kernel else None,
            "error": self.error,
        }


class SessionManager:
    """Live sessions by owner."""

    def __init__(self, max_log_entries: int, max_log_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.max_log_entries = max_log_entries
        self.max_log_bytes = max_log_bytes
        self._sessions: dict[tuple[str, str], Session] = {}

    def create(self, workspace: str, session_id: str, app_id: str | None) -> Session:
        key = (workspace, session_id)
        existing = self._sessions.get(key)
        if existing and not existing.ended:
            raise SessionExistsError(
                f"Session '{session_id}' is already {existing.state.value} in workspace "
                f"'{workspace}'. Stop it first or start with another id."
            )
        session = Session(
            id=session_id,
            workspace=workspace,
            log=SessionLog(self.max_log_entries, self.max_log_bytes),
            app_id=app_id,
        )
        self._sessions[key] = session
        self._forget_old_failures()
        return session

    def _forget_old_failures(self) -> None:
        ended = [s for s in self._sessions.values() if s.ended]
        for session in sorted(ended, key=lambda s: s.created_at)[: -MAX_FAILED_KEPT or None]:
            self.remove(session)

    def get(self, workspace: str, session_id: str) -> Session:
        session = self._sessions.get((workspace, session_id))
        if session is None:
            raise SessionNotFoundError(
                f"No session '{session_id}' in workspace '{workspace}'. "
                "List yours with list_sessions()."
            )
        return session

    def remove(self, session: Session) -> None:
        if self._sessions.get((session.workspace, session.id)) is session:
            del self._sessions[(session.workspace, session.id)]

    def list(self, workspace: str | None = None) -> list[Session]:
        return [s for (ws, _), s in self._sessions.items() if workspace in (None, ws)]

    def count(self, workspace: str | None = None) -> int:
        """Sessions that hold resources (not failed records kept for their logs)."""
        return sum(
            1 for (ws, _), s in self._sessions.items() if workspace in (None, ws) and not s.ended
        )
