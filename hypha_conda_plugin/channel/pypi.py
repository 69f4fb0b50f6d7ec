"""Get wheels from PyPI: validate requirements, run ``pip download``, read the wheels.

pip already knows how to resolve a closure against the index (and the mirrors or
find-links directories an air-gapped site configures), so the builder lets pip pick one
version of everything and only reads what it downloaded. This module is the only place
that runs pip or parses wheel metadata.
"""

from __future__ import annotations

import email.parser
import hashlib
import platform as _platform
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from hypha_conda_plugin.channel.errors import ChannelBuildError
from hypha_conda_plugin.childenv import clean_env

# pip settings that say *where* and *how patiently* to fetch packages are kept (mirrors
# and find-links dirs at air-gapped sites); everything else under PIP_* (PIP_USER,
# PIP_TARGET, PIP_REQUIRE_VIRTUALENV, PIP_ONLY_BINARY, ...) changes what pip does in ways
# the build cannot expect.


@dataclass(frozen=True)
class Wheel:
    """What the converter needs to know about one downloaded wheel."""

    path: Path
    name: str  # conda-style name
    version: str
    pure: bool
    requires: tuple[str, ...]
    sha256: str


def parse_requirements(requirements: Iterable[str]) -> list[str]:
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


def download_wheels(requirements: Sequence[str], dest: Path) -> list[Path]:
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
    proc = subprocess.run(
        cmd,
        env=clean_env(pip_mirror=True, extra={"PIP_DISABLE_PIP_VERSION_CHECK": "1"}),
        capture_output=True,
        text=True,
        check=False,
    )
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


def read_wheel(path: Path) -> Wheel:
    """Read name, version, purity and Requires-Dist from a wheel file."""
    name, version, _build, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as zf:
        meta = email.parser.Parser().parsestr(
            zf.read(f"{dist_info_dir(zf)}/METADATA").decode("utf-8", "replace")
        )
    return Wheel(
        path=path,
        name=conda_name(name),
        version=str(version),
        pure=all(t.abi == "none" and t.platform == "any" for t in tags),
        requires=tuple(meta.get_all("Requires-Dist") or ()),
        sha256=_sha256_file(path),
    )


def dist_info_dir(zf: zipfile.ZipFile) -> str:
    """The wheel's ``.dist-info`` directory name."""
    dirs = {n.split("/", 1)[0] for n in zf.namelist() if n.endswith(".dist-info/METADATA")}
    dirs = {d for d in dirs if d.count("/") == 0}
    if len(dirs) != 1:
        raise ChannelBuildError(f"{zf.filename}: expected one .dist-info directory, found {dirs}")
    return dirs.pop()


def conda_name(name: str) -> str:
    """conda-style package name: lowercase, runs of ``-_.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", canonicalize_name(name)).lower()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
