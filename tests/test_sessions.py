"""Session folders and logs."""

from __future__ import annotations

import pytest

from hypha_conda_plugin.errors import SessionExistsError, SessionNotFoundError
from hypha_conda_plugin.sessions import (
    MAX_FAILED_KEPT,
    SessionLog,
    SessionManager,
    SessionState,
)


def test_log_is_bounded_and_pages_within_a_type():
    log = SessionLog(limit=3)
    for i in range(5):
        log.add("stdout" if i % 2 else "info", str(i))
    everything = log.query()
    assert [item["content"] for item in everything["items"]] == ["2", "3", "4"]
    assert log.dropped == 2
    page = log.query("info", offset=1, limit=5)
    assert [item["content"] for item in page["items"]] == ["4"]
    assert page["total"] == 2


def test_ids_are_per_workspace_and_live_ids_are_unique(tmp_path):
    manager = SessionManager(max_log_entries=100)
    a = manager.create("ws-a", "s", None)
    b = manager.create("ws-b", "s", None)
    assert a is not b
    with pytest.raises(SessionExistsError):
        manager.create("ws-a", "s", None)
    with pytest.raises(SessionNotFoundError):
        manager.get("ws-c", "s")
    a.state = SessionState.FAILED
    assert manager.create("ws-a", "s", None) is not a  # a failed id may be reused


def test_only_the_most_recent_failed_sessions_are_kept(tmp_path):
    manager = SessionManager(max_log_entries=100)
    for i in range(MAX_FAILED_KEPT + 5):
        manager.create("ws", f"failed-{i}", None).state = SessionState.FAILED
    live = manager.create("ws", "live", None)
    kept = {s.id for s in manager.list()}
    assert live.id in kept
    assert len(kept) == MAX_FAILED_KEPT + 1
    assert "failed-0" not in kept and f"failed-{MAX_FAILED_KEPT + 4}" in kept
