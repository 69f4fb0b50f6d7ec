"""Turn one wheel into a conda package: its files, entry points and scripts.

A wheel is laid out for installation into a site-packages; a conda package is laid out
relative to an environment prefix. Pure wheels become ``noarch: python`` packages (conda
places ``site-packages`` and creates entry points at install time, from ``link.json``);
binary wheels become platform packages with the interpreter's paths and launchers baked
in. Converted packages are keyed by their inputs, so an unchanged wheel is never
converted twice.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from packaging.version import InvalidVersion, Version

from hypha_conda_plugin.channel.conda_format import (
    BUILDER_VERSION,
    PackageFile,
    platform_fields,
    write_conda,
)
from hypha_conda_plugin.channel.pypi import Wheel, dist_info_dir

#: Placeholder conda replaces with the environment prefix (used in generated scripts).
PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3"


def ensure_wheel_package(
    wheel: Wheel, depends: list[str], channel: Path, subdir: str, log: Callable[[str], None]
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
        index.update(platform_fields(subdir))
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
        written = write_conda(dest.parent, files, lambda _paths: index, extra_info)
    assert written == dest, (written, dest)
    return dest


def _conda_version(version: str) -> str:
    """PEP 440 normalised versions are valid conda versions except for ``-``."""
    try:
        return str(Version(version)).replace("-", "_")
    except InvalidVersion:
        return version.replace("-", "_")


def _wheel_files(zf: zipfile.ZipFile, wheel: Wheel) -> tuple[list[PackageFile], list[str]]:
    """Map wheel members to package paths; return files and console entry points."""
    major, minor = sys.version_info[:2]
    site = "site-packages" if wheel.pure else f"lib/python{major}.{minor}/site-packages"
    scripts = "python-scripts" if wheel.pure else "bin"
    dist_info = dist_info_dir(zf)
    data_dir = dist_info[: -len(".dist-info")] + ".data"
    files: list[PackageFile] = []
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
        files.append(PackageFile(path, data, mode, placeholder=placeholder))
    files.append(PackageFile(f"{site}/{dist_info}/INSTALLER", b"conda\n"))
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


def _entry_point_scripts(entry_points: Sequence[str]) -> list[PackageFile]:
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
        files.append(PackageFile(f"bin/{name}", script.encode(), 0o755, placeholder=PLACEHOLDER))
    return files
