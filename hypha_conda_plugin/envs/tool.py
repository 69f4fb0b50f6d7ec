"""``python -m hypha_conda_plugin envs list|prune``: the cache as an operator sees it.

Works on the folder directly, with the same locks as the workers, so it is safe while
workers run on it: whatever a session, a warm kernel or a build holds (in any process)
is reported as in use and never removed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from hypha_conda_plugin.envs.eviction import DAY, describe
from hypha_conda_plugin.envs.store import CacheLayout, Removal

MIN_KEY_PREFIX = 4


def list_text(layout: CacheLayout, *, as_json: bool = False) -> str:
    rows = describe(layout)
    if as_json:
        return json.dumps(rows, indent=2)
    if not rows:
        return f"No environments in {layout.envs_dir}."
    now = time.time()
    table = [("KEY", "STATUS", "IN USE", "SIZE", "AGE", "LAST USED", "SPEC")]
    for row in rows:
        table.append(
            (
                row["key"],
                row["status"],
                "yes" if row["in_use"] else "no",
                _size(row.get("size")),
                _ago(row.get("age_seconds")),
                _ago(now - row["last_used"]) + " ago" if row.get("last_used") else "-",
                _spec(row.get("spec")),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in table
    ]
    total = sum(row.get("size") or 0 for row in rows)
    lines.append(f"{len(rows)} environments, {_size(total)} in {layout.envs_dir}")
    return "\n".join(lines)


def prune(
    layout: CacheLayout,
    *,
    everything: bool = False,
    older_than_days: float | None = None,
    keys: Sequence[str] = (),
    dry_run: bool = False,
) -> tuple[list[str], int]:
    """Remove the chosen environments that nothing uses; returns (report lines, exit code).

    The exit code is 1 when a key named on the command line is unknown or could not be
    removed; environments skipped by ``--all`` or ``--older-than`` because they are in
    use are reported but are not failures.
    """
    rows = {row["key"]: row for row in describe(layout, with_size=False)}
    lines: list[str] = []
    failed = False
    chosen: list[str] = []
    if everything:
        chosen = list(rows)
    elif older_than_days is not None:
        limit = older_than_days * DAY
        chosen = [k for k, r in rows.items() if r.get("age_seconds", 0) > limit]
    for wanted in keys:
        matches = [k for k in rows if k.startswith(wanted)] if len(wanted) >= MIN_KEY_PREFIX else []
        if len(matches) != 1:
            what = "matches several environments" if matches else "is not in the cache"
            lines.append(f"error: {wanted!r} {what} (see `envs list`)")
            failed = True
            continue
        chosen.append(matches[0])
    for key in dict.fromkeys(chosen):
        label = f"{key} ({_spec(rows[key].get('spec')) or rows[key]['status']})"
        if dry_run:
            lines.append(f"would remove {label}" + (" (in use)" if rows[key]["in_use"] else ""))
            continue
        outcome = layout.remove(key)
        if outcome in (Removal.REMOVED, Removal.MISSING):
            lines.append(f"removed {label}")
        else:
            lines.append(f"kept {label}: {outcome.value}")
            failed = failed or key in keys or any(key.startswith(k) for k in keys)
    if not chosen and not failed:
        lines.append("Nothing to remove.")
    return lines, 1 if failed else 0


def _spec(spec: Any) -> str:
    if not isinstance(spec, dict):
        return ""
    text = ", ".join([*spec.get("conda", []), *(f"pip:{p}" for p in spec.get("pip", []))])
    channels = spec.get("channels") or []
    return text + (f" [{', '.join(channels)}]" if channels else "")


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    number = float(value)
    for unit in ("B", "K", "M", "G"):
        if number < 1024:
            return f"{number:.0f}{unit}" if unit == "B" else f"{number:.1f}{unit}"
        number /= 1024
    return f"{number:.1f}T"


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
