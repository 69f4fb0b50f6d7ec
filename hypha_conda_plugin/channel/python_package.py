"""Package the running interpreter as the channel's ``python`` conda package.

The channel has to provide the same Python the worker runs on, without conda-forge. The
package is made from the interpreter's *base* prefix (not a virtualenv), minus
``site-packages``, test suites, caches and other bulk a kernel never needs. Its ELF files
get ``RPATH=$ORIGIN/...`` (see :mod:`~hypha_conda_plugin.channel.elf_rpath`), and text
files that mention the host prefix are marked for prefix replacement. Packaging takes a
few seconds, so the result is recorded and reused while the interpreter is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform as _platform
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from hypha_conda_plugin.channel.conda_format import (
    BUILDER_VERSION,
    PackageFile,
    platform_fields,
    write_conda,
    write_json_atomic,
)
from hypha_conda_plugin.channel.elf_rpath import find_patchelf, patched_elf

_PYTHON_RECORD = "python-package.json"
_KEEP_BIN = re.compile(r"^(python[0-9.]*(-config)?|pydoc[0-9.]*|2to3(-[0-9.]+)?)$")
# Stdlib parts (relative to lib/pythonX.Y) that no kernel imports.
_STDLIB_BULK = (
    "test",
    "idlelib",
    "turtledemo",
    "tkinter/test",
    "lib2to3/tests",
    "ctypes/test",
    "distutils/tests",
    "unittest/test",
    "sqlite3/test",
)


def ensure_python_package(dest_dir: Path, work: Path, log: Callable[[str], None]) -> Path:
    """Package the running interpreter's base prefix unless done for the same inputs."""
    key = _python_key()
    record_path = work / _PYTHON_RECORD
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(record_path.read_text())
        existing = dest_dir / record["file"]
        if record.get("key") == key and existing.is_file():
            return existing
    prefix = Path(sys.base_prefix)
    log(f"Packaging the Python interpreter from {prefix} (one-off, a few seconds) ...")
    version = _platform.python_version()

    def make_index(paths: list[dict[str, object]]) -> dict[str, object]:
        digest = hashlib.sha256(json.dumps(paths, sort_keys=True).encode()).hexdigest()
        return {
            "name": "python",
            "version": version,
            "build": f"h{digest[:10]}_0_cpython",
            "build_number": 0,
            "depends": [],
            "license": "Python-2.0",
            "subdir": dest_dir.name,
            "timestamp": int(time.time() * 1000),
            **platform_fields(dest_dir.name),
        }

    with tempfile.TemporaryDirectory(dir=work, prefix="patchelf-") as scratch:
        dest = write_conda(dest_dir, _python_files(prefix, Path(scratch)), make_index, {})
    write_json_atomic(record_path, {"key": key, "file": dest.name})
    return dest


def _python_key() -> str:
    """Identify the interpreter install cheaply (no content hashing on reuse)."""
    prefix = Path(sys.base_prefix)
    major, minor = sys.version_info[:2]
    probes = [prefix / f"bin/python{major}.{minor}", *prefix.glob("lib/libpython*"), _stdlib_dir()]
    stats = [(str(p), p.stat().st_mtime_ns) for p in probes if p.exists()]
    return hashlib.sha256(
        json.dumps([BUILDER_VERSION, sys.version, sys.base_prefix, stats]).encode()
    ).hexdigest()


def _stdlib_dir() -> Path:
    major, minor = sys.version_info[:2]
    return Path(sys.base_prefix) / "lib" / f"python{major}.{minor}"


def _python_files(prefix: Path, scratch: Path) -> Iterator[PackageFile]:
    """The files of the ``python`` package, read (and patched) from ``prefix``."""
    rels = sorted(_python_paths(prefix))
    present = set(rels)
    patchelf = find_patchelf()
    old = str(prefix).encode()
    for rel in rels:
        src = prefix / rel
        if src.is_symlink():
            target = _relative_link(src, prefix)
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
            if resolved in present:
                yield PackageFile(rel, symlink=target)
            continue
        data = src.read_bytes()
        mode = 0o755 if os.access(src, os.X_OK) else 0o644
        if data[:4] == b"\x7fELF":
            data = patched_elf(src, rel, patchelf, scratch, prefix)
            yield PackageFile(rel, data, mode)
        elif old in data and b"\x00" not in data:
            yield PackageFile(rel, data, mode, placeholder=str(prefix))
        else:
            yield PackageFile(rel, data, mode)
    for alias in ("python", "python3"):
        rel = f"bin/{alias}"
        if rel not in present:
            yield PackageFile(rel, symlink=f"python{sys.version_info[0]}.{sys.version_info[1]}")


def _python_paths(prefix: Path) -> Iterator[str]:
    """Relative paths of the base prefix worth shipping (files and symlinks)."""
    stdlib = _stdlib_dir().relative_to(prefix).as_posix()
    skip = {f"{stdlib}/{p}" for p in _STDLIB_BULK}
    foreign = _installed_by_pip(prefix, prefix / stdlib / "site-packages")
    for dirpath, dirnames, filenames in os.walk(prefix):
        rel_dir = Path(dirpath).relative_to(prefix).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        kept = []
        for d in dirnames:
            rel = rel_dir + d
            if d == "__pycache__" or rel in skip:
                continue
            if (Path(dirpath) / d).is_symlink():
                yield rel
                continue
            kept.append(d)
        dirnames[:] = kept
        for f in filenames:
            rel = rel_dir + f
            if rel not in foreign and _ships(rel, stdlib):
                yield rel


def _installed_by_pip(prefix: Path, site_packages: Path) -> set[str]:
    """Files that distributions in the base site-packages put elsewhere in the prefix.

    pip installs scripts and data files (``bin/ipython``, ``share/man/...``) next to the
    standard library; they belong to those distributions, not to Python.
    """
    found: set[str] = set()
    for record in site_packages.glob("*.dist-info/RECORD"):
        with contextlib.suppress(OSError):
            for line in record.read_text(errors="replace").splitlines():
                name = line.rsplit(",", 2)[0] if line.count(",") >= 2 else line
                path = Path(os.path.normpath(site_packages / name))
                if path.is_relative_to(prefix):
                    found.add(path.relative_to(prefix).as_posix())
    for listing in site_packages.glob("*.egg-info/installed-files.txt"):
        with contextlib.suppress(OSError):
            for line in listing.read_text(errors="replace").splitlines():
                path = Path(os.path.normpath(listing.parent / line))
                if path.is_relative_to(prefix):
                    found.add(path.relative_to(prefix).as_posix())
    return found


def _ships(rel: str, stdlib: str) -> bool:
    """Whether a file of the base prefix belongs in the package."""
    if rel.endswith((".pyc", ".pyo")):
        return False
    if rel.startswith("bin/"):
        return _KEEP_BIN.match(rel[4:]) is not None
    if rel.startswith(f"{stdlib}/site-packages/"):
        return rel == f"{stdlib}/site-packages/README.txt"
    if rel.startswith(f"{stdlib}/config-"):
        # The static library and object file are only for embedding; ~45 MB.
        return not rel.endswith((".a", ".o"))
    return True


def _relative_link(link: Path, prefix: Path) -> str:
    """Symlink target, made relative when it points into the prefix by absolute path."""
    target = os.readlink(link)
    if os.path.isabs(target) and Path(target).is_relative_to(prefix):
        return os.path.relpath(target, link.parent)
    return target
