"""The ready marker of an environment, and the cheap check that it is still whole.

An environment counts only once its marker exists: written last, atomically, after every
build step succeeded. Besides the (redacted) spec it records a *fingerprint*: for every
package in ``conda-meta`` (and every distribution pip installed), a few of its files
spread over its file list, with their sizes. Reuse then checks, with ``stat`` calls only:

* every package the marker lists still has its ``conda-meta`` record;
* every fingerprinted file still exists with its recorded size.

Credentials the builder wrote into ``conda-meta`` (channel URLs with tokens) are
redacted there before the fingerprint is taken.

Deleting a package's folder, or most of its files, removes fingerprinted files, so the
next start notices and rebuilds. A single damaged file outside the sample is not seen:
that is the price of a check that costs well under a millisecond per package (measured
in ``benchmarks/bench_cache.py``) rather than reading every file. Bytecode files are
never sampled: compiling an environment later rewrites them legitimately.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from hypha_conda_plugin.redact import redact

MARKER = "conda-meta/hypha-conda-plugin-ready.json"
MARKER_FORMAT = 2
#: Files sampled per package; the check's cost grows linearly with it.
SAMPLES_PER_PACKAGE = 6
_NOT_A_FILE = -1


def marker_path(prefix: Path) -> Path:
    return prefix / MARKER


def write_marker(prefix: Path, key: str, spec: dict[str, list[str]], builder: str) -> None:
    """Fingerprint the finished environment and write its marker (0600) atomically."""
    payload = {
        "format": MARKER_FORMAT,
        "key": key,
        "spec": spec,
        "builder": builder,
        "created": time.time(),
        "conda": _conda_fingerprint(prefix),
        "pip": _pip_fingerprint(prefix),
    }
    marker = marker_path(prefix)
    tmp = marker.with_name(marker.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, separators=(",", ":"))
    os.replace(tmp, marker)


def read_marker(prefix: Path) -> dict[str, Any] | None:
    """The marker's content, or ``None`` when there is none (a half-built folder)."""
    try:
        data = json.loads(marker_path(prefix).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # present but unreadable: a damaged environment
    return data if isinstance(data, dict) else {}


def marker_signature(prefix: Path) -> tuple[int, int, int] | None:
    """Identity of the marker file: changes whenever the environment is rebuilt."""
    try:
        info = os.stat(marker_path(prefix))
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def check(prefix: Path, marker: dict[str, Any]) -> str | None:
    """Why the environment at ``prefix`` must not be reused, or ``None`` if it is whole.

    Plain string paths and ``os`` calls: ``pathlib`` objects would cost more than the
    system calls themselves, and this runs on every start.
    """
    if marker.get("format") != MARKER_FORMAT:
        return "its ready marker is missing, unreadable or from an older version"
    root = os.fspath(prefix) + os.sep
    meta = root + "conda-meta" + os.sep
    lstat = os.lstat
    for section in ("conda", "pip"):
        for package, files in marker.get(section, {}).items():
            if section == "conda":
                try:
                    lstat(meta + package + ".json")
                except OSError:
                    return f"package {package} is no longer recorded in conda-meta"
            for relative, size in files:
                try:
                    info = lstat(root + relative)
                except FileNotFoundError:
                    return f"{relative} (of {package}) is missing"
                except OSError as error:
                    return f"{relative} (of {package}) cannot be read ({error.strerror})"
                if size != _NOT_A_FILE and info.st_size != size and stat.S_ISREG(info.st_mode):
                    return (
                        f"{relative} (of {package}) changed size "
                        f"({info.st_size} bytes, {size} when built)"
                    )
    return None


def _conda_fingerprint(prefix: Path) -> dict[str, list[list]]:
    result: dict[str, list[list]] = {}
    meta = prefix / "conda-meta"
    for record in sorted(meta.glob("*.json")):
        if record.name == Path(MARKER).name:
            continue
        try:
            files = _files_of(_scrubbed(record))
        except (OSError, ValueError):
            continue
        sample = _sample(prefix, files)
        if record.stem.startswith("python-"):
            sample += _sample(prefix, _interpreter(prefix))
        result[record.stem] = sample
    return result


def _files_of(record: str) -> list[str]:
    """The ``files`` list of a conda-meta record. Records run to megabytes (their
    ``paths_data`` repeats every path with hashes), so only the list is decoded when it
    can be found as a top-level key; otherwise the whole record is."""
    start = record.find('"files":')
    if start > 0:
        with contextlib.suppress(ValueError):
            bracket = record.index("[", start)
            files, _ = json.JSONDecoder().raw_decode(record, bracket)
            if isinstance(files, list):
                return [f for f in files if isinstance(f, str)]
    files = json.loads(record).get("files") or []
    return [f for f in files if isinstance(f, str)]


def _scrubbed(record: Path) -> str:
    """A conda-meta record's text, rewritten without credentials if it had any: the
    builder records each package's channel URL there, token included, and user code in
    the environment can read it."""
    text = record.read_text()
    clean = redact(text)
    if clean != text:
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(clean)
        os.replace(tmp, record)
    return clean


def _pip_fingerprint(prefix: Path) -> dict[str, list[list]]:
    """Distributions that pip (not conda) installed: sampled from their RECORD files."""
    result: dict[str, list[list]] = {}
    for installer in prefix.glob("lib/python*/site-packages/*.dist-info/INSTALLER"):
        with contextlib.suppress(OSError):
            if installer.read_text().strip() != "pip":
                continue
            site = installer.parent.parent
            rows = (installer.parent / "RECORD").read_text().splitlines()
            files = [
                os.path.relpath(os.path.normpath(site / row.split(",", 1)[0]), prefix)
                for row in rows
                if row.strip()
            ]
            result[installer.parent.name] = _sample(
                prefix, [f for f in files if not f.startswith("..")]
            )
    return result


def _interpreter(prefix: Path) -> list[str]:
    """The real file behind ``bin/python``: the one thing every kernel needs."""
    try:
        target = (prefix / "bin" / "python").resolve(strict=True)
        return [str(target.relative_to(prefix.resolve()))]
    except (OSError, ValueError):
        return []


def _sample(prefix: Path, files: list[str]) -> list[list]:
    """Up to ``SAMPLES_PER_PACKAGE`` files spread evenly over the list, with sizes."""
    candidates = [f for f in files if not f.endswith((".pyc", ".pyo")) and "__pycache__" not in f]
    if len(candidates) > SAMPLES_PER_PACKAGE:
        step = (len(candidates) - 1) / (SAMPLES_PER_PACKAGE - 1)
        candidates = [candidates[round(i * step)] for i in range(SAMPLES_PER_PACKAGE)]
    sample = []
    for relative in candidates:
        try:
            info = os.lstat(prefix / relative)
        except OSError:
            continue  # listed but not installed (some packages list optional files)
        size = info.st_size if stat.S_ISREG(info.st_mode) else _NOT_A_FILE
        sample.append([relative, size])
    return sample
