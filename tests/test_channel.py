"""The offline channel builder, exercised for real: PyPI wheels in, conda environments out.

The session fixture ``offline_channel`` builds (or reuses) the shared channel with numpy
and pandas; environments are solved and installed from it with py-rattler in a child
process, then run with a clean environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypha_conda_plugin.channel import (
    ChannelBuildError,
    ChannelBuildResult,
    build_channel,
    dependencies,
    pypi,
    wheel_package,
)
from hypha_conda_plugin.channel import build as channel_build

# py-rattler 0.28 may crash while the interpreter exits, so the child leaves with
# os._exit(0) once its output is flushed.
INSTALL_SCRIPT = r"""
import asyncio, json, os, sys, time
from rattler import Channel, ChannelConfig, Gateway, VirtualPackage, install, solve

alias, prefix, cache, *specs = sys.argv[1:]

async def main():
    channel = Channel("conda-forge", ChannelConfig(channel_alias=alias))
    started = time.monotonic()
    records = await solve(
        sources=[channel],
        specs=specs,
        virtual_packages=VirtualPackage.detect(),
        gateway=Gateway(cache_dir=os.path.join(cache, "repodata")),
    )
    solved = time.monotonic()
    await install(
        records,
        target_prefix=prefix,
        cache_dir=os.path.join(cache, "pkgs"),
        show_progress=False,
    )
    done = time.monotonic()
    print(json.dumps({
        "records": sorted(f"{r.name.normalized}-{r.version}-{r.build}" for r in records),
        "solve_s": solved - started,
        "install_s": done - solved,
    }))

asyncio.run(main())
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""

PROBE_SCRIPT = r"""
import json, sys
import numpy, pandas, ipykernel
libpython = [line.split()[-1] for line in open("/proc/self/maps") if "libpython" in line]
print(json.dumps({
    "prefix": sys.prefix,
    "base_prefix": sys.base_prefix,
    "path": sys.path,
    "std": float(numpy.array([1, 2, 3, 4, 5]).std(ddof=1)),
    "pandas_sum": int(pandas.DataFrame({"a": [1, 2, 3]})["a"].sum()),
    "numpy_file": numpy.__file__,
    "ipykernel": ipykernel.__version__,
    "libpython": sorted(set(libpython)),
}))
"""


def clean_env() -> dict[str, str]:
    """The environment without host Python settings that would leak into a child."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("PIP_")
    }
    env["PYTHONNOUSERSITE"] = "1"
    return env


def install_env(result: ChannelBuildResult, prefix: Path, cache: Path, specs: list[str]) -> dict:
    """Solve and install ``specs`` from the channel into ``prefix`` (in a child process)."""
    proc = subprocess.run(
        [sys.executable, "-c", INSTALL_SCRIPT, result.alias_url, str(prefix), str(cache), *specs],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_env(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=prefix,
    )


def package_names(result: ChannelBuildResult) -> list[str]:
    return [p.rsplit("-", 2)[0] for p in result.packages]


def test_channel_layout(offline_channel: ChannelBuildResult) -> None:
    root = offline_channel.root
    assert root.is_absolute()
    assert offline_channel.alias_url == root.as_uri() + "/"
    subdir = channel_build._current_subdir()
    for d in (subdir, "noarch"):
        repodata = json.loads((root / "conda-forge" / d / "repodata.json").read_text())
        assert repodata["info"]["subdir"] == d
        for filename, record in repodata["packages.conda"].items():
            path = root / "conda-forge" / d / filename
            assert path.stat().st_size == record["size"]
            assert record["subdir"] == d
    names = package_names(offline_channel)
    assert len(names) == len(set(names)), "each package exactly once"
    for name in ("python", "pip", "ipykernel", "hypha-rpc", "numpy", "pandas"):
        assert name in names
    assert offline_channel.packages == sorted(offline_channel.packages)


def test_environment_from_channel_runs_numpy_pandas_ipykernel(
    offline_channel: ChannelBuildResult, tmp_path: Path
) -> None:
    prefix = tmp_path / "env"
    started = time.monotonic()
    report = install_env(
        offline_channel, prefix, tmp_path / "cache", ["python", "ipykernel", "numpy", "pandas"]
    )
    print(
        f"solve {report['solve_s']:.2f}s, install {report['install_s']:.2f}s, "
        f"total {time.monotonic() - started:.2f}s"
    )
    assert any(r.startswith("python-3.") for r in report["records"])

    proc = run_in_env(prefix, prefix / "bin" / "python", "-c", PROBE_SCRIPT)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["prefix"] == str(prefix)
    assert info["base_prefix"] == str(prefix)
    assert info["std"] == pytest.approx(1.5811388300841898)
    assert info["pandas_sum"] == 6
    assert info["numpy_file"].startswith(str(prefix / "lib"))
    assert info["ipykernel"]
    # The host interpreter stays hidden: no host paths, and libpython from the env.
    host_prefixes = {sys.base_prefix, sys.prefix}
    for entry in info["path"]:
        assert not any(entry.startswith(h) for h in host_prefixes), entry
    assert info["libpython"], "python should link libpython"
    assert all(p.startswith(str(prefix)) for p in info["libpython"]), info["libpython"]

    # Entry points: from a noarch package (link.json) and from a binary package.
    jupyter = run_in_env(prefix, prefix / "bin" / "jupyter", "--paths")
    assert jupyter.returncode == 0, jupyter.stderr
    numpy_config = run_in_env(prefix, prefix / "bin" / "numpy-config", "--version")
    assert numpy_config.returncode == 0, numpy_config.stderr
    assert numpy_config.stdout.strip()
    # The kernel spec shipped as wheel data lands under the prefix.
    assert (prefix / "share" / "jupyter" / "kernels" / "python3" / "kernel.json").is_file()


def test_same_inputs_are_reused_without_pip(
    offline_channel: ChannelBuildResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pip(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("pip must not run when the inputs are unchanged")

    # Not a stand-in: a tripwire proving the real builder never calls pip on reuse.
    # Patched where the build looks it up, and at its source.
    monkeypatch.setattr(channel_build, "download_wheels", no_pip)
    monkeypatch.setattr(pypi, "download_wheels", no_pip)
    lines: list[str] = []
    started = time.monotonic()
    again = build_channel(offline_channel.root, ["pandas", "numpy"], log=lines.append)
    elapsed = time.monotonic() - started
    assert again.reused is True
    assert again.packages == offline_channel.packages
    assert again.root == offline_channel.root
    assert elapsed < 2, elapsed
    assert lines


def linked_copy(channel: Path, copy: Path) -> Path:
    """A hard-linked copy: a package file the builder rewrites gets a new inode."""
    shutil.copytree(channel, copy, copy_function=os.link, ignore=shutil.ignore_patterns("lock"))
    return copy


def test_changed_requirements_reuse_converted_packages(
    offline_channel: ChannelBuildResult, tmp_path: Path
) -> None:
    copy = linked_copy(offline_channel.root, tmp_path / "channel")
    channel_dir = copy / "conda-forge"
    before = {p.name: p for p in channel_dir.glob("*/*.conda")}

    lines: list[str] = []
    started = time.monotonic()
    result = build_channel(copy, ["numpy", "iniconfig"], log=lines.append)
    elapsed = time.monotonic() - started
    print(f"incremental build {elapsed:.1f}s")

    assert result.reused is False
    names = package_names(result)
    assert "iniconfig" in names
    assert "pandas" not in names  # no longer requested: pruned
    assert not list(channel_dir.glob("*/pandas-*.conda"))
    converted = [line for line in lines if line.startswith("Converting")]
    assert len(converted) == 1 and "iniconfig" in converted[0], converted
    assert not any("Packaging the Python interpreter" in line for line in lines)
    for name in result.packages:
        if name.startswith(("python-3", "numpy-", "ipykernel-")):
            path = next(channel_dir.glob(f"*/{name}.conda"))
            assert os.path.samefile(path, before[path.name]), f"{name} was rebuilt"
    # The original channel is untouched and still complete.
    assert build_channel(offline_channel.root, ["numpy", "pandas"], log=lambda _: None).reused


def test_interrupted_build_is_not_reused(
    offline_channel: ChannelBuildResult, tmp_path: Path
) -> None:
    copy = linked_copy(offline_channel.root, tmp_path / "channel")
    inputs = channel_build._inputs(
        pypi.parse_requirements([*channel_build.BASE_REQUIREMENTS, "numpy", "pandas"]),
        channel_build._current_subdir(),
    )
    assert channel_build._reusable_packages(copy, inputs) is not None
    victim = next((copy / "conda-forge").glob("noarch/*.conda"))
    victim.unlink()
    assert channel_build._reusable_packages(copy, inputs) is None
    (copy / ".channel-inputs.json").unlink()
    assert channel_build._reusable_packages(copy, inputs) is None


def test_missing_requirement_is_named(tmp_path: Path) -> None:
    with pytest.raises(ChannelBuildError) as excinfo:
        build_channel(tmp_path / "channel", ["this-package-does-not-exist-hcp"], log=print)
    assert "this-package-does-not-exist-hcp" in str(excinfo.value)
    assert not (tmp_path / "channel" / ".channel-inputs.json").exists()


def test_invalid_requirement_fails_before_any_download(tmp_path: Path) -> None:
    with pytest.raises(ChannelBuildError, match="numpy>>1"):
        build_channel(tmp_path / "channel", ["numpy>>1"], log=print)


@pytest.mark.parametrize(
    ("pep440", "conda"),
    [
        (">=1.2,<2", ">=1.2,<2"),
        ("~=1.4.5", ">=1.4.5,<1.5"),
        ("~=2.2", ">=2.2,<3"),
        ("==1.2.*", "1.2.*"),
        ("!=1.3", "!=1.3"),
        (">=2.0rc1", ""),  # pre-releases do not translate cleanly: name only
        ("===1.0", ""),
    ],
)
def test_version_constraints_translate_or_drop(pep440: str, conda: str) -> None:
    from packaging.specifiers import SpecifierSet

    got = dependencies._conda_spec(SpecifierSet(pep440))
    assert sorted(got.split(",")) == sorted(conda.split(","))


def test_names_are_conda_style() -> None:
    assert pypi.conda_name("Typing_Extensions") == "typing-extensions"
    assert pypi.conda_name("zope.interface") == "zope-interface"


def make_wheel(path: Path, name: str, tag: str) -> Path:
    """A small synthetic wheel with every kind of ``.data`` content and an entry point."""
    import zipfile

    wheel = path / f"{name}-1.0-{tag}.whl"
    dist_info, data = f"{name}-1.0.dist-info", f"{name}-1.0.data"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"{name}/__init__.py", "VALUE = 1\n")
        zf.writestr(f"{dist_info}/METADATA", f"Name: {name}\nVersion: 1.0\n")
        zf.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\n")
        zf.writestr(f"{dist_info}/INSTALLER", "pip\n")
        zf.writestr(
            f"{dist_info}/entry_points.txt", f"[console_scripts]\n{name}-cli = {name}:main\n"
        )
        zf.writestr(f"{data}/scripts/{name}-tool", "#!python\nprint('hi')\n")
        zf.writestr(f"{data}/data/share/{name}/thing.txt", "data\n")
        zf.writestr(f"{data}/headers/{name}.h", "/* dropped */\n")
        zf.writestr(f"{data}/platlib/{name}_ext.py", "X = 2\n")
    return wheel


@pytest.mark.parametrize("pure", [True, False])
def test_wheel_layout(tmp_path: Path, pure: bool) -> None:
    import zipfile

    tag = "py3-none-any" if pure else "cp311-cp311-manylinux_2_17_x86_64"
    wheel = pypi.read_wheel(make_wheel(tmp_path, "demo_pkg", tag))
    assert wheel.name == "demo-pkg"
    assert wheel.pure is pure
    with zipfile.ZipFile(wheel.path) as zf:
        files, entry_points = wheel_package._wheel_files(zf, wheel)
    by_path = {f.path: f for f in files}
    major, minor = sys.version_info[:2]
    site = "site-packages" if pure else f"lib/python{major}.{minor}/site-packages"
    scripts = "python-scripts" if pure else "bin"
    assert f"{site}/demo_pkg/__init__.py" in by_path
    assert f"{site}/demo_pkg_ext.py" in by_path
    assert "share/demo_pkg/thing.txt" in by_path
    assert not any(p.endswith(".h") for p in by_path)
    assert by_path[f"{site}/demo_pkg-1.0.dist-info/INSTALLER"].data == b"conda\n"
    script = by_path[f"{scripts}/demo_pkg-tool"]
    assert script.data.startswith(f"#!{wheel_package.PLACEHOLDER}/bin/python\n".encode())
    assert script.placeholder == wheel_package.PLACEHOLDER and script.mode == 0o755
    assert entry_points == ["demo_pkg-cli = demo_pkg:main"]
