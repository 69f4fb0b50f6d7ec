"""How busy a worker is, as one number Hypha can compare between workers.

Hypha's app controller picks the worker with the smallest ``get_load()`` when an app is
installed or started with ``worker_selection_mode="select:min:get_load"`` (it asks every
candidate, with a 2 s timeout). The number is built so that whole units count work and
the fraction breaks ties:

- 1 per live session (starting, ready or busy): a kernel holding memory;
- 1 more per session still starting: environment build, file staging, kernel launch;
- 1 per cell running now;
- plus the share of this machine's memory in use (0 to 1), so between workers with the
  same work the one with more free memory wins.

It is computed from the session registry and one small read of ``/proc/meminfo``
(memory-backed, no disk), at most once a second: cheap, nothing waits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hypha_conda_plugin.sessions import Session

_MEMORY_TTL = 1.0
_memory_cache: tuple[float, float] = (0.0, 0.0)


def worker_load(sessions: Iterable[Session]) -> float:
    """The load number described above."""
    from hypha_conda_plugin.sessions import SessionState

    live = starting = running = 0
    for session in sessions:
        if session.state in (SessionState.STARTING, SessionState.READY, SessionState.BUSY):
            live += 1
            running += max(0, session.running)
            if session.state == SessionState.STARTING:
                starting += 1
    return float(live + starting + running) + memory_used_fraction()


def memory_used_fraction() -> float:
    """Share of the machine's memory in use, 0..1 (below 1, so it never outweighs a
    session); 0 where it cannot be read."""
    global _memory_cache
    now = time.monotonic()
    if now - _memory_cache[0] < _MEMORY_TTL:
        return _memory_cache[1]
    fraction = min(0.999, max(0.0, _read_memory_fraction()))
    _memory_cache = (now, fraction)
    return fraction


def _read_memory_fraction() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            fields = dict(
                (line.split(":", 1)[0], int(line.split()[1])) for line in handle if ":" in line
            )
        total, available = fields["MemTotal"], fields["MemAvailable"]
        return 1.0 - available / total if total else 0.0
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:  # Other systems: free pages (page cache counts as used, so it overstates).
        total = os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_AVPHYS_PAGES")
        return 1.0 - free / total if total > 0 else 0.0
    except (ValueError, OSError, AttributeError):
        return 0.0
