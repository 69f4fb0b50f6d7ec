"""Session state, per-session logs and the registry of live sessions.

A session belongs to the workspace that started it: the registry is keyed by
``(workspace, session_id)``, so the same id in two workspaces names two sessions and a
lookup can only ever find the caller's own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypha_conda_plugin.errors import SessionExistsError, SessionNotFoundError

if TYPE_CHECKING:
    from hypha_conda_plugin.envs.cache import EnvLease
    from hypha_conda_plugin.kernel import Kernel

LOG_TYPES = ("stdout", "stderr", "info", "error", "progress")
#: Failed sessions are kept so their logs can explain the failure; this many at most.
MAX_FAILED_KEPT = 20
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class SessionState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class SessionLog:
    """Bounded log of one session: old entries go first once ``limit`` is reached."""

    def __init__(self, limit: int) -> None:
        self._items: deque[dict[str, Any]] = deque(maxlen=limit)
        self.dropped = 0

    def add(self, kind: str, content: str) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append({"type": kind, "content": content, "time": time.time()})

    def query(self, kind: str | None = None, offset: int = 0, limit: int | None = None) -> dict:
        items = [item for item in self._items if kind is None or item["type"] == kind]
        total = len(items)
        offset = max(0, offset)
        window = items[offset:] if limit is None else items[offset : offset + max(0, limit)]
        return {"items": window, "total": total, "offset": offset, "limit": limit}


def safe_name(value: str) -> str:
    """A folder name derived from an arbitrary id: readable, unique, no path tricks."""
    readable = _UNSAFE.sub("_", value).strip("._")[:60] or "session"
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


@dataclass
class Session:
    id: str
    workspace: str
    workdir: Path
    runtime_dir: Path
    log: SessionLog
    app_id: str | None = None
    state: SessionState = SessionState.STARTING
    created_at: float = field(default_factory=time.time)
    env: EnvLease | None = None
    kernel: Kernel | None = None
    error: str | None = None
    executions: int = 0
    running: int = 0
    start_task: asyncio.Task | None = None

    def record_output(self, item: dict[str, Any]) -> None:
        """Keep a cell's printed text in the session log (rich outputs stay in results)."""
        if item.get("type") == "stream":
            self.log.add(item.get("name", "stdout"), item.get("text", ""))

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "workspace": self.workspace,
            "app_id": self.app_id,
            "status": self.state.value,
            "created_at": self.created_at,
            "working_dir": str(self.workdir),
            "environment": str(self.env.prefix) if self.env else None,
            "environment_key": self.env.key if self.env else None,
            "environment_reused": self.env.reused if self.env else None,
            "executions": self.executions,
            "kernel_pid": self.kernel.pid if self.kernel else None,
            "error": self.error,
        }


class SessionManager:
    """Live sessions by owner; derives every session folder from validated names."""

    def __init__(self, working_dir: Path, max_log_entries: int) -> None:
        self.working_dir = working_dir
        self.max_log_entries = max_log_entries
        self._sessions: dict[tuple[str, str], Session] = {}

    def create(self, workspace: str, session_id: str, app_id: str | None) -> Session:
        key = (workspace, session_id)
        existing = self._sessions.get(key)
        if existing and existing.state not in (SessionState.FAILED, SessionState.STOPPED):
            raise SessionExistsError(
                f"Session '{session_id}' is already {existing.state.value} in workspace "
                f"'{workspace}'. Stop it first or start with another id."
            )
        base = self.working_dir / safe_name(workspace)
        session = Session(
            id=session_id,
            workspace=workspace,
            workdir=self._inside(base / safe_name(session_id)),
            runtime_dir=self._inside(
                self.working_dir / ".runtime" / safe_name(f"{workspace}/{session_id}")
            ),
            log=SessionLog(self.max_log_entries),
            app_id=app_id,
        )
        self._sessions[key] = session
        self._forget_old_failures()
        return session

    def _forget_old_failures(self) -> None:
        failed = [s for s in self._sessions.values() if s.state == SessionState.FAILED]
        for session in sorted(failed, key=lambda s: s.created_at)[: -MAX_FAILED_KEPT or None]:
            self.remove(session)

    def get(self, workspace: str, session_id: str) -> Session:
        session = self._sessions.get((workspace, session_id))
        if session is None:
            raise SessionNotFoundError(
                f"No session '{session_id}' in workspace '{workspace}'. "
                "List yours with list_sessions()."
            )
        return session

    def find_any(self, session_id: str) -> Session:
        """Look a session up in every workspace (only for the server's own root calls)."""
        matches = [s for (_, sid), s in self._sessions.items() if sid == session_id]
        if len(matches) != 1:
            raise SessionNotFoundError(f"No session '{session_id}'.")
        return matches[0]

    def remove(self, session: Session) -> None:
        if self._sessions.get((session.workspace, session.id)) is session:
            del self._sessions[(session.workspace, session.id)]

    def list(self, workspace: str | None = None) -> list[Session]:
        return [s for (ws, _), s in self._sessions.items() if workspace in (None, ws)]

    def _inside(self, path: Path) -> Path:
        # Pure path arithmetic (no file system access on the event loop): the names come
        # from safe_name and the root is already resolved, so there are no links to follow.
        resolved = Path(os.path.normpath(path))
        if not resolved.is_relative_to(self.working_dir):
            raise ValueError(f"Session folder {resolved} would lie outside {self.working_dir}")
        return resolved
