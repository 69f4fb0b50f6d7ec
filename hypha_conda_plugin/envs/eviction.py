"""Which environments leave the cache, and the sweep that removes them.

Policy (``evict``), in this order:

1. an environment built longer ago than ``max_age`` goes (so unpinned specs pick up
   fixes at least that often, as the users' documentation promises);
2. while more than ``max_envs`` remain, or more than ``max_size`` bytes, the least
   recently used goes. "Used" is a session starting or ending on it (the mtime of its
   lease file, which every worker sharing the folder updates); warm kernels holding an
   environment do not count as use.

Whatever anyone holds (a session, a warm kernel, a build: any lease in any process) is
skipped, and the next least recently used goes in its place; the cache may stay over its
limits while everything in it is in use. The exception: an environment this worker holds
only for itself (warm kernels, the background bytecode pass: ``reclaimable``) keeps its
turn. It is reported in ``to_reclaim``; the cache asks those holders to let go and sweeps
again, so the least recently used still goes first. The sweep (``sweep``) also removes what a
killed run left: half-built environments nobody is building, lock files of environments
that no longer exist, and the trash. It runs in a thread, one process at a time per
cache folder.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from hypha_conda_plugin.envs.integrity import marker_signature, read_marker
from hypha_conda_plugin.envs.locks import EXCLUSIVE, LockFile, is_locked
from hypha_conda_plugin.envs.store import CacheLayout, Removal, is_key, tree_size

logger = logging.getLogger(__name__)

DAY = 86400.0
#: How long a sweep waits for another process's sweep of the same folder.
SWEEP_LOCK_WAIT = 10.0


@dataclass(frozen=True)
class CacheLimits:
    max_envs: int = 10
    max_age: float = 30 * DAY
    max_size: int | None = None
    sweep_interval: float = 3600.0


@dataclass(frozen=True)
class EnvRecord:
    """One ready environment as a sweep or a listing sees it."""

    key: str
    created: float
    last_used: float
    signature: tuple[int, int, int] | None
    spec: dict[str, Any]
    size: int | None = None


@dataclass
class SweepReport:
    removed: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    kept_in_use: list[str] = field(default_factory=list)
    #: Due to go, held only by what this worker can give back (see the module's docs).
    to_reclaim: list[str] = field(default_factory=list)
    half_built: list[str] = field(default_factory=list)
    stale_lock_files: int = 0
    read_only: bool = False
    skipped: bool = False  # another process was sweeping


def evict(
    records: list[EnvRecord],
    limits: CacheLimits,
    now: float,
    remove: Callable[[EnvRecord], Removal],
    reclaimable: Collection[str] = (),
) -> tuple[list[tuple[EnvRecord, str]], list[EnvRecord], list[EnvRecord]]:
    """Apply the policy; ``remove`` tries one environment. Returns what went (with the
    reason), what should have gone but is in use, and what should have gone and is held
    only by ``reclaimable`` holders (to be asked to let go: it keeps its turn)."""
    removed: list[tuple[EnvRecord, str]] = []
    busy: list[EnvRecord] = []
    reclaim: list[EnvRecord] = []
    remaining = sorted(records, key=lambda r: r.last_used)
    for record in list(remaining):
        age = now - record.created
        if age > limits.max_age:
            reason = f"built {_span(age)} ago, older than CONDA_CACHE_MAX_AGE_DAYS"
            if _gone(remove(record)):
                removed.append((record, reason))
                remaining.remove(record)
            elif record.key in reclaimable:
                reclaim.append(record)
                remaining.remove(record)
            else:
                busy.append(record)
    count = len(remaining)
    size = sum(r.size or 0 for r in remaining)
    for record in remaining:
        over_count = count > limits.max_envs
        over_size = limits.max_size is not None and size > limits.max_size
        if not (over_count or over_size):
            break
        if over_count:
            reason = f"least recently used; {count} environments > CONDA_CACHE_MAX_ENVS"
        else:
            reason = f"least recently used; {_bytes(size)} > CONDA_CACHE_MAX_SIZE"
        reason += f" (last used {_span(now - record.last_used)} ago)"
        if _gone(remove(record)):
            removed.append((record, reason))
            count -= 1
            size -= record.size or 0
        elif record.key in reclaimable:
            reclaim.append(record)  # counted as gone: a more recently used one stays
            count -= 1
            size -= record.size or 0
        elif record not in busy:
            busy.append(record)
    return removed, busy, reclaim


def _gone(outcome: Removal) -> bool:
    return outcome in (Removal.REMOVED, Removal.MISSING)


def sweep(
    layout: CacheLayout,
    limits: CacheLimits,
    *,
    now: float | None = None,
    reclaimable: Collection[str] = (),
) -> SweepReport:
    """One pass over the cache folder (blocking: run it in a thread). ``reclaimable``:
    keys this process holds only with leases it can give back."""
    report = SweepReport()
    if not layout.prepare():
        report.read_only = True
        return report
    lock = _sweep_lock(layout)
    if lock is None:
        report.skipped = True
        return report
    try:
        layout.empty_trash()
        records = []
        for key in layout.keys():
            record = read_record(layout, key, with_size=limits.max_size is not None)
            if record is not None:
                records.append(record)
            elif layout.remove(key, only="unready") is Removal.REMOVED:
                logger.warning("Removed half-built environment %s (an interrupted build)", key)
                report.half_built.append(key)
        report.stale_lock_files = remove_stale_lock_files(layout)
        removed, busy, reclaim = evict(
            records,
            limits,
            time.time() if now is None else now,
            lambda r: layout.remove(r.key, expect=r.signature),
            reclaimable,
        )
        for record, reason in removed:
            logger.info(
                "Removed cached environment %s (%s): %s",
                record.key,
                ", ".join(record.spec.get("conda", [])) or "unknown spec",
                reason,
            )
        report.removed = [(r.key, reason) for r, reason in removed]
        report.kept_in_use = [r.key for r in busy]
        report.to_reclaim = [r.key for r in reclaim]
        if busy:
            logger.info(
                "Kept environments in use although over the cache limits: %s",
                ", ".join(report.kept_in_use),
            )
    finally:
        lock.release()
    return report


def _sweep_lock(layout: CacheLayout) -> LockFile | None:
    deadline = time.monotonic() + SWEEP_LOCK_WAIT
    while True:
        lock = LockFile.try_lock(layout.sweep_lock, EXCLUSIVE)
        if lock is not None or time.monotonic() > deadline:
            return lock
        time.sleep(0.1)


def read_record(layout: CacheLayout, key: str, *, with_size: bool) -> EnvRecord | None:
    """The ready environment ``key``, or ``None`` if its folder has no marker."""
    prefix = layout.prefix(key)
    signature = marker_signature(prefix)
    marker = read_marker(prefix) if signature else None
    if marker is None:
        return None
    created = marker.get("created")
    if not isinstance(created, int | float):
        created = os.path.getmtime(prefix) if prefix.exists() else time.time()
    return EnvRecord(
        key=key,
        created=float(created),
        last_used=layout.last_used(key) or float(created),
        signature=signature,
        spec=marker.get("spec") if isinstance(marker.get("spec"), dict) else {},
        size=tree_size(prefix) if with_size else None,
    )


def remove_stale_lock_files(layout: CacheLayout) -> int:
    """Lock files of environments that no longer exist (a killed deletion or build)."""
    removed = 0
    present = set(layout.keys())
    orphans: set[str] = set()
    try:
        names = os.listdir(layout.meta_dir)
    except OSError:
        names = []
    for name in names:
        key, _, kind = name.rpartition(".")
        if kind in ("lease", "build") and is_key(key) and key not in present:
            orphans.add(key)
    for name in os.listdir(layout.envs_dir):
        key = name[1:].removesuffix(".lock")
        if name.startswith(".") and name.endswith(".lock") and is_key(key):
            orphans.add(key)  # the old layout's lock file: never used any more
    for key in sorted(orphans):
        if key in present:
            legacy = LockFile.try_lock(layout.legacy_lock(key), EXCLUSIVE, create=False)
            if legacy is not None:
                legacy.unlink()
                legacy.release()
                removed += 1
        elif layout.remove(key, only="absent") is Removal.MISSING:
            removed += 1
    return removed


def describe(
    layout: CacheLayout, *, with_size: bool = True, local_leases: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Every environment folder with what an operator wants to know about it."""
    now = time.time()
    rows = []
    for key in layout.keys():
        record = read_record(layout, key, with_size=with_size)
        building = is_locked(layout.build_path(key))
        row: dict[str, Any] = {
            "key": key,
            "status": "ready" if record else ("building" if building else "half-built"),
            "prefix": str(layout.prefix(key)),
            "in_use": is_locked(layout.lease_path(key)),
            "leases_here": (local_leases or {}).get(key, 0),
        }
        if record:
            row.update(
                spec=record.spec,
                size=record.size,
                created=record.created,
                last_used=record.last_used,
                age_seconds=now - record.created,
            )
        rows.append(row)
    return rows


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
