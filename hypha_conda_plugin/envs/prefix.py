"""Facts read from an installed environment's folder (blocking: run them in a thread)."""

from __future__ import annotations

import re
from pathlib import Path

_PYTHON_DIR = re.compile(r"^python(\d+\.\d+)$")


def python_version(prefix: Path) -> str | None:
    """``3.11`` for an environment with ``lib/python3.11``; None when there is none."""
    try:
        names = [p.name for p in (prefix / "lib").iterdir()]
    except OSError:
        return None
    for name in sorted(names, reverse=True):
        match = _PYTHON_DIR.match(name)
        if match:
            return match.group(1)
    return None


def stdlib_dir(prefix: Path) -> Path | None:
    """The environment's standard library folder (``lib/python3.X``), if it has one."""
    version = python_version(prefix)
    return None if version is None else prefix / "lib" / f"python{version}"
