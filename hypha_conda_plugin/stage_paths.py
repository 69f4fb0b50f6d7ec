"""Paths of staged files: every name comes from outside, every write stays in the folder.

Shared by the one-file-per-request path (staging.py) and the zip path (staging_zip.py),
so both apply the same rules: a name is checked before it becomes a path, the final path
is resolved and must lie inside the session folder, and files are created without ever
following or reusing an existing entry. Everything here touches the disk: call it from
a thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from hypha_conda_plugin.errors import StagingError


def safe_name(name: object) -> bool:
    """A listing entry must be one plain path component."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(ch in name for ch in ("/", "\\", "\0"))
    )


def resolved_dir(dest: Path) -> Path:
    root = dest.resolve(strict=True)
    if not root.is_dir():
        raise StagingError(f"The session folder {dest} is not a folder.")
    return root


def inside(root: Path, relative: str, source: str) -> Path:
    """``root / relative``, resolved, or :class:`StagingError` if it leaves ``root``.

    Resolving follows any symlink already on the way, so a link pointing out of the
    session folder is caught here too. The last component stays unresolved: if it is a
    symlink, ``os.replace`` swaps the link itself and ``open_new`` refuses it, so
    nothing is ever written through it.
    """
    candidate = root / relative
    parent = candidate.parent.resolve()
    final = parent / candidate.name
    if (
        os.path.isabs(relative)
        or candidate.name in ("", ".", "..")
        or not parent.is_relative_to(root)
        or final == root
    ):
        raise StagingError(
            f"Refusing to stage '{source}' to '{relative}': it would land outside the "
            "session folder. Rename the file in the app or remove it from files_to_stage."
        )
    return final


def open_new(path: Path) -> BinaryIO:
    """Create ``path`` for writing; never follows or reuses an existing entry."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o644), "wb")


def replace(temp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(f"'{target.name}' already exists as a folder")
    os.replace(temp, target)


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
