"""Write conda packages (``.conda``) and the ``repodata.json`` that indexes them.

Everything that knows the on-disk conda formats lives here, so the converters only
describe *what* goes into a package (a list of :class:`PackageFile`) and never how it is
archived. Packages are zips of zstd-compressed tars: zstd at a low level compresses the
~100 MB interpreter in about a second on two cores, where bzip2 would take tens of
seconds. The repodata is built by reading each package's own ``info/index.json``, so it
cannot disagree with the packages it lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from hypha_conda_plugin.channel.errors import ChannelBuildError

#: Bump when the conversion changes, so old package files and stamps are not reused.
#: Every cache key (the inputs stamp, converted wheels, the python package) includes it.
BUILDER_VERSION = "2"
#: zstd level for package payloads. Measured on the ~55 MB interpreter payload (2 cores):
#: level 3 takes 0.5 s for 20.6 MB, level 19 (conda-forge's) 15.5 s for 17.1 MB, and
#: bzip2 (.tar.bz2) 3.9 s for 20.7 MB.
ZSTD_LEVEL = 3
#: File name endings of conda packages (what reuse checks and pruning look for).
PACKAGE_SUFFIXES = (".conda", ".tar.bz2")


@dataclass(frozen=True)
class PackageFile:
    """One file (or symlink) to put into a conda package."""

    path: str
    data: bytes = b""
    mode: int = 0o644
    symlink: str | None = None
    placeholder: str | None = None


def write_conda(
    dest_dir: Path,
    files: Iterable[PackageFile],
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
                    _add_file(tar, PackageFile(name, data), mtime)
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


def _add_file(tar: tarfile.TarFile, f: PackageFile, mtime: int) -> dict[str, object]:
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


def platform_fields(subdir: str) -> dict[str, str]:
    plat, _, arch = subdir.partition("-")
    arch = {"64": "x86_64", "32": "x86"}.get(arch, arch)
    return {"platform": plat, "arch": arch}


def package_id(filename: str) -> str:
    """``name-version-build`` from a package file name."""
    for suffix in PACKAGE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def write_all_repodata(channel: Path, subdir: str, files: Sequence[str]) -> list[str]:
    """Write ``repodata.json`` for the platform subdir and ``noarch``; return package ids.

    ``files`` are package paths relative to the ``channel`` directory.
    """
    packages = []
    for d in (subdir, "noarch"):
        records = {}
        for rel in sorted(f for f in files if f.startswith(f"{d}/")):
            path = channel / rel
            records[path.name] = _repodata_record(path)
            packages.append(package_id(path.name))
        repodata = {
            "info": {"subdir": d},
            "packages": {},
            "packages.conda": records,
            "removed": [],
            "repodata_version": 1,
        }
        write_json_atomic(channel / d / "repodata.json", repodata)
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


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON so readers see either the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
