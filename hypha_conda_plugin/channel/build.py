"""Orchestrate a channel build: decide whether to rebuild, then build, prune and index.

This is the only module that knows the channel's directory layout and its reuse rules;
the steps themselves (pip, wheel conversion, interpreter packaging, ``.conda`` writing)
live in their own modules and know nothing about each other's caching. Rebuilding with
the same inputs returns immediately; with changed inputs, package files whose inputs did
not change are kept. The inputs stamp is written last, so an interrupted build is never
mistaken for a complete one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hypha_conda_plugin.channel.conda_format import (
    BUILDER_VERSION,
    PACKAGE_SUFFIXES,
    package_id,
    write_all_repodata,
    write_json_atomic,
)
from hypha_conda_plugin.channel.dependencies import conda_depends
from hypha_conda_plugin.channel.pypi import download_wheels, parse_requirements, read_wheel
from hypha_conda_plugin.channel.python_package import ensure_python_package
from hypha_conda_plugin.channel.wheel_package import ensure_wheel_package

#: The channel name the output stands in for (used with a channel alias).
CHANNEL_NAME = "conda-forge"
#: Packages every channel gets: a kernel needs ipykernel, the worker talks hypha-rpc.
BASE_REQUIREMENTS = ("pip", "ipykernel", "hypha-rpc")

_STAMP = ".channel-inputs.json"
_WORK = ".build"


@dataclass(frozen=True)
class ChannelBuildResult:
    """Where the channel is and what it holds."""

    root: Path
    alias_url: str
    packages: list[str]
    reused: bool


def build_channel(
    out: Path, requirements: Sequence[str] = (), *, log: Callable[[str], None] = print
) -> ChannelBuildResult:
    """Build (or reuse) an offline conda channel in ``out``.

    ``requirements`` are pip requirement strings added to the base set (pip, ipykernel,
    hypha-rpc); their closures come from PyPI (or the pip-configured index) as wheels.
    """
    root = Path(out).expanduser().resolve()
    reqs = parse_requirements([*BASE_REQUIREMENTS, *requirements])
    subdir = _current_subdir()
    inputs = _inputs(reqs, subdir)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / _WORK / "lock"):
        packages = _reusable_packages(root, inputs)
        if packages is not None:
            log(f"Offline channel in {root} is up to date ({len(packages)} packages).")
            return _result(root, packages, reused=True)
        started = time.monotonic()
        (root / _STAMP).unlink(missing_ok=True)
        files = _build(root, reqs, subdir, log)
        packages = write_all_repodata(root / CHANNEL_NAME, subdir, files)
        write_json_atomic(root / _STAMP, {"inputs": inputs, "files": sorted(files)})
        log(
            f"Offline channel ready: {len(packages)} packages in {time.monotonic() - started:.1f} s"
        )
        return _result(root, packages, reused=False)


def _current_subdir() -> str:
    """The conda platform name of this machine (e.g. ``linux-64``)."""
    import rattler

    # ``Platform`` was renamed ``Subdir`` (0.28 warns on the old name).
    subdir_type = getattr(rattler, "Subdir", None) or rattler.Platform
    return str(subdir_type.current())


def _inputs(requirements: Sequence[str], subdir: str) -> dict[str, object]:
    """Everything that decides the channel's content, for the reuse stamp."""
    return {
        "builder": BUILDER_VERSION,
        "requirements": sorted(requirements),
        "python": sys.version,
        "base_prefix": sys.base_prefix,
        "subdir": subdir,
    }


def _reusable_packages(root: Path, inputs: dict[str, object]) -> list[str] | None:
    """Packages of a complete earlier build with the same inputs, else ``None``."""
    try:
        stamp = json.loads((root / _STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("inputs") != inputs:
        return None
    channel = root / CHANNEL_NAME
    if not all((channel / d / "repodata.json").is_file() for d in (inputs["subdir"], "noarch")):
        return None
    files = stamp.get("files") or []
    if not all((channel / f).is_file() for f in files):
        return None
    return sorted(package_id(Path(f).name) for f in files)


def _result(root: Path, packages: list[str], *, reused: bool) -> ChannelBuildResult:
    return ChannelBuildResult(
        root=root, alias_url=root.as_uri() + "/", packages=sorted(packages), reused=reused
    )


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise builders of the same channel (parallel test sessions share one)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(
    root: Path, requirements: list[str], subdir: str, log: Callable[[str], None]
) -> list[str]:
    """Create every package file; return their paths relative to the channel dir."""
    channel = root / CHANNEL_NAME
    for d in (subdir, "noarch"):
        (channel / d).mkdir(parents=True, exist_ok=True)
    work = root / _WORK
    _remove_leftovers(work)
    with tempfile.TemporaryDirectory(dir=work, prefix="wheels-") as wheel_dir:
        log(f"Downloading wheels for {', '.join(requirements)} ...")
        wheel_paths = download_wheels(requirements, Path(wheel_dir))
        wheels = [read_wheel(p) for p in wheel_paths]
        log(f"Resolved {len(wheels)} wheels.")
        names = {w.name for w in wheels}
        files = [ensure_python_package(channel / subdir, work, log)]
        for wheel in wheels:
            depends = conda_depends(wheel, wheels, names)
            files.append(ensure_wheel_package(wheel, depends, channel, subdir, log))
    rel = [str(f.relative_to(channel)) for f in files]
    _prune(channel, (subdir, "noarch"), set(rel))
    return rel


def _remove_leftovers(work: Path) -> None:
    """Delete scratch directories of builds that were killed (we hold the lock)."""
    for pattern in ("wheels-*", "patchelf-*"):
        for leftover in work.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _prune(channel: Path, subdirs: Iterable[str], keep: set[str]) -> None:
    """Remove packages from earlier builds that are not part of this closure."""
    for d in subdirs:
        for entry in (channel / d).iterdir():
            rel = f"{d}/{entry.name}"
            stale = entry.name.endswith(PACKAGE_SUFFIXES) and rel not in keep
            if stale or entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)
