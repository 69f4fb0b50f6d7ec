"""Environments built by the operator's own package manager (issue 10), and build
children that never choke on long messages (issue 6, item 5).

The conda here is real: conda 26.7.1 from ``../shared/conda/`` in a virtualenv of its own
(see tests/conda_tool.py), with its own HOME, CONDARC and package cache, pointed at the
offline channel. Where no conda can be had, the tests that need one skip and say why.
mamba and micromamba cannot be installed here: the only ``mamba`` these tests run is a
fault injected on purpose (a script that crashes), to see the worker fall back to conda.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from hypha_conda_plugin.childenv import package_manager_env
from hypha_conda_plugin.envs.builders import RattlerBuilder
from hypha_conda_plugin.envs.child_process import ChildTimeout, run_child
from hypha_conda_plugin.envs.cli_builder import CliBuilder
from hypha_conda_plugin.envs.selection import make_builder, select_package_manager
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import EnvironmentBuildError, PackageManagerError
from hypha_conda_plugin.local_server import LocalServer
from hypha_conda_plugin.settings import Settings, SettingsError
from tests.conda_tool import (
    RealConda,
    conda_home,
    conda_processes,
    find_real_conda,
    tool_folder,
)
from tests.conftest import WALKTHROUGH_DEPENDENCIES
from tests.test_pip_dependencies import make_wheel

CLI = [sys.executable, "-m", "hypha_conda_plugin"]
ONE_MB = 1024 * 1024


async def quiet(_: dict) -> None:
    return None


@pytest.fixture(scope="session")
def real_conda() -> RealConda:
    found = find_real_conda()
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture(scope="module")
def conda_pkgs(session_tmp: Path) -> Path:
    """One conda package cache for this module's workers, so only the first build is cold."""
    return session_tmp / "pm-conda-pkgs"


def _history(prefix: Path) -> str:
    history = prefix / "conda-meta" / "history"
    return history.read_text() if history.exists() else ""


def _built_by_conda(prefix: Path) -> bool:
    """conda records itself in the environment's history; py-rattler does not."""
    return "# conda version:" in _history(prefix)


def _env_dirs(cache: Path) -> list[Path]:
    envs = cache / "envs"
    return [p for p in envs.iterdir() if p.is_dir()] if envs.exists() else []


# ------------------------------------------------------------------ selection


def test_auto_picks_conda_when_it_is_the_only_tool_on_path(real_conda, tmp_path):
    tools = tool_folder(tmp_path, real_conda)
    settings = Settings.from_env({"PATH": f"{tools}:/usr/bin:/bin"}, working_dir=tmp_path)
    selection = select_package_manager(settings)
    assert selection.chosen == "conda"
    assert selection.order == ("conda", "rattler")
    assert f"conda found at {tools / 'conda'} (PATH)" in selection.reason
    # pip's `conda` entry point refuses `create`; the worker runs its interpreter instead.
    assert selection.tools[0].command[-2:] == ("-m", "conda")


def test_selection_order_and_reasons(tmp_path):
    (tmp_path / "bin").mkdir()
    for name in ("mamba", "micromamba", "conda"):
        tool = tmp_path / "bin" / name
        tool.write_text("#!/bin/sh\nexit 0\n")
        tool.chmod(0o755)
    path = str(tmp_path / "bin")

    def order(**values) -> tuple[str, ...]:
        settings = Settings(working_dir=tmp_path / "w", tool_search_path=path, **values)
        return select_package_manager(settings).order

    assert order() == ("mamba", "micromamba", "conda", "rattler")
    assert order(package_manager="micromamba") == ("micromamba", "conda", "rattler")
    assert order(package_manager="conda") == ("conda", "rattler")
    assert order(package_manager="rattler") == ("rattler",)
    # Nothing on PATH: MAMBA_EXE / CONDA_EXE (set by the tools' shell activation) count.
    exe = Settings(
        working_dir=tmp_path / "w",
        tool_search_path="/nonexistent",
        mamba_exe=str(tmp_path / "bin" / "micromamba"),
        conda_exe=str(tmp_path / "bin" / "conda"),
    )
    selection = select_package_manager(exe)
    assert selection.order == ("micromamba", "conda", "rattler")
    assert "(MAMBA_EXE)" in selection.reason
    # A relative or empty PATH entry would mean the current folder: never searched.
    relative = Settings(working_dir=tmp_path / "w", tool_search_path=":bin:.")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert select_package_manager(relative).order == ("rattler",)
    finally:
        os.chdir(cwd)
    # No tool at all: the embedded solver, and the reason says what was looked for.
    bare = select_package_manager(Settings(working_dir=tmp_path / "w"))
    assert bare.order == ("rattler",)
    assert "no mamba, micromamba or conda" in bare.reason
    assert isinstance(make_builder(Settings(working_dir=tmp_path / "w")), RattlerBuilder)


def test_a_requested_tool_that_is_missing_says_so_and_uses_the_next(tmp_path):
    settings = Settings(
        working_dir=tmp_path / "w", package_manager="mamba", tool_search_path="/nonexistent"
    )
    selection = select_package_manager(settings)
    assert selection.requested_missing
    assert selection.chosen == "rattler"
    assert "CONDA_PACKAGE_MANAGER=mamba, but no mamba" in selection.reason


def test_package_manager_setting_is_validated():
    assert Settings.from_env({"CONDA_PACKAGE_MANAGER": " Mamba "}).package_manager == "mamba"
    with pytest.raises(SettingsError, match="package_manager"):
        Settings.from_env({"CONDA_PACKAGE_MANAGER": "pip"})


def test_tool_environment_carries_its_config_and_never_the_workers_secrets(tmp_path):
    host = {
        "HOME": "/home/op",
        "CONDARC": "/etc/op/condarc",
        "MAMBA_ROOT_PREFIX": "/opt/mamba",
        "CONDA_PKGS_DIRS": "/data/pkgs",
        "CONDA_OVERRIDE_CUDA": "12.4",
        "HTTPS_PROXY": "http://proxy:3128",
        "HYPHA_TOKEN": "secret-token",
        "DATABASE_PASSWORD": "secret",
        "CONDA_CHANNEL_ALIAS": "file:///ours",  # the worker's setting, not conda's
        "CONDA_CACHE_DIR": "/ours",
        "PIP_INDEX_URL": "https://user:pw@mirror/simple",
        "PYTHONPATH": "/somewhere",
        "CONDA_PREFIX": "/worker/env",
    }
    env = package_manager_env(tmp_path, host=host)
    for kept in ("HOME", "CONDARC", "MAMBA_ROOT_PREFIX", "CONDA_PKGS_DIRS", "HTTPS_PROXY"):
        assert env[kept] == host[kept]
    assert env["CONDA_OVERRIDE_CUDA"] == "12.4"
    for dropped in (
        "HYPHA_TOKEN",
        "DATABASE_PASSWORD",
        "CONDA_CHANNEL_ALIAS",
        "CONDA_CACHE_DIR",
        "PIP_INDEX_URL",
        "PYTHONPATH",
        "CONDA_PREFIX",
    ):
        assert dropped not in env
    assert env["PATH"].startswith(f"{tmp_path}:")


# ------------------------------------------------------------------ no line limit


async def test_child_output_has_no_line_limit_and_stderr_never_blocks(tmp_path):
    """A test-only child (plain Python, said so here) prints a 1 MB stdout line and then
    8 MB of stderr in one line: the reader must take the first whole and drain the
    second (keeping a bounded tail), or the child would block on a full pipe."""
    script = (
        "import sys\n"
        f"sys.stdout.write('x' * {ONE_MB} + '\\n'); sys.stdout.flush()\n"
        f"sys.stderr.write('E' * {8 * ONE_MB} + '\\n')\n"
        "sys.stderr.write('last words\\n')\n"
    )
    records: list[bytes] = []

    async def keep(record: bytes) -> None:
        records.append(record)

    result = await run_child(
        [sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin"}, timeout=60, on_stdout=keep
    )
    assert result.returncode == 0
    assert records == [b"x" * ONE_MB]
    assert result.stderr_tail.endswith("last words")
    assert len(result.stderr_tail) < 5 * ONE_MB  # bounded, whatever the child prints
    assert result.stderr_tail.startswith("E" * ONE_MB)  # the head of the long line


async def test_child_time_limit_kills_the_whole_group(tmp_path):
    marker = f"hcp-sleeper-{os.getpid()}"
    script = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{marker}'])\n"
        "time.sleep(600)\n"
    )
    with pytest.raises(ChildTimeout):
        await run_child(
            [sys.executable, "-c", script, marker], env={"PATH": "/usr/bin:/bin"}, timeout=2
        )
    for _ in range(50):
        if not conda_processes(marker):
            break
        await asyncio.sleep(0.1)
    assert conda_processes(marker) == []


async def test_a_one_megabyte_solver_error_from_the_embedded_solver_is_reported(
    offline_channel, tmp_path
):
    """rattler's own message for a 1 MB package name is a 1 MB JSON line from the child."""
    name = "h" * ONE_MB
    builder = RattlerBuilder(
        pkgs_dir=tmp_path / "pkgs",
        repodata_cache_dir=tmp_path / "repodata",
        channel_alias=offline_channel.alias_url,
        timeout=300,
    )
    spec = EnvSpec.from_manifest({"dependencies": ["python", name]})
    with pytest.raises(EnvironmentBuildError) as raised:
        await builder.build(spec, tmp_path / "env", quiet)
    assert not isinstance(raised.value, PackageManagerError)  # the request's fault
    assert name in str(raised.value)
    assert "No candidates were found" in str(raised.value)


async def test_a_one_megabyte_solver_error_from_conda_is_reported(
    real_conda, offline_channel, tmp_path
):
    """conda names the missing 1 MB package in a JSON document of about 4 MB."""
    name = "h" * ONE_MB
    builder = _conda_builder(real_conda, offline_channel, tmp_path)
    spec = EnvSpec.from_manifest({"dependencies": ["python", name]})
    with pytest.raises(EnvironmentBuildError) as raised:
        await builder.build(spec, tmp_path / "envs" / "big", quiet)
    assert not isinstance(raised.value, PackageManagerError)
    assert "PackagesNotFound" in str(raised.value) and name in str(raised.value)
    assert list((tmp_path / "envs").iterdir()) == []  # no prefix, no spec file


def _conda_builder(conda: RealConda, channel, root: Path) -> CliBuilder:
    tools = tool_folder(root, conda)
    settings = Settings(working_dir=root / "w", tool_search_path=str(tools))
    selection = select_package_manager(settings)
    return CliBuilder(
        selection.tools[0],
        channel_alias=channel.alias_url,
        timeout=600,
        env=package_manager_env(tools, host=conda_home(root / "conda", conda)),
    )


# ------------------------------------------------------------------ conda inside a server


@pytest.fixture(scope="module")
async def conda_server(offline_channel, real_conda, session_tmp, conda_pkgs):
    """A real Hypha server whose worker has CONDA_PACKAGE_MANAGER=conda.

    Its ``conda`` is a wrapper that records the environment the worker gives it (to
    check no secret reaches the tool), then runs the real conda.
    """
    root = session_tmp / "pm-server"
    probe = root / "conda-env.txt"
    tools = tool_folder(root, real_conda, env_probe=probe)
    dirs = {"working": root / "sessions", "cache": root / "cache"}
    server = LocalServer(
        root / "server",
        s3=False,
        server_apps=False,
        plugin_env={
            "CONDA_PACKAGE_MANAGER": "conda",
            "PATH": f"{tools}:{os.environ['PATH']}",
            **conda_home(root / "conda", real_conda, pkgs_dir=conda_pkgs),
            "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
            "CONDA_WORKING_DIR": str(dirs["working"]),
            "CONDA_CACHE_DIR": str(dirs["cache"]),
            "DATABASE_PASSWORD": "canary-secret",
        },
    )
    async with server:
        from hypha_rpc import connect_to_server

        token = await server.user_token("conda-ws")
        api = await connect_to_server(
            {"server_url": server.url, "workspace": "conda-ws", "token": token}
        )
        worker = await api.get_service("public/conda-worker")
        yield {"server": server, "worker": worker, "probe": probe, **dirs}
        await api.disconnect()


async def test_sessions_in_environments_conda_built_run_cells_with_pip_items(
    conda_server, tmp_path
):
    worker = conda_server["worker"]
    log = conda_server["server"].log_path.read_text()
    assert "package manager: conda (CONDA_PACKAGE_MANAGER=conda: conda found at" in log
    wheel = make_wheel(tmp_path)
    messages: list[dict] = []
    manifest = {"dependencies": [*WALKTHROUGH_DEPENDENCIES, {"pip": [str(wheel)]}]}
    session_id = await worker.start(
        {"id": "conda-built", "manifest": manifest, "progress_callback": messages.append}
    )
    try:
        result = await worker.execute(
            session_id,
            "import sys, numpy, pandas, hcp_hello\n"
            "print(hcp_hello.GREETING, numpy.arange(4).sum(), sys.prefix)",
        )
        assert result["status"] == "ok", result
        greeting, prefix = result["outputs"][0]["text"].rsplit(" ", 1)
        assert greeting == "hello from a pip package 6"
        assert _built_by_conda(Path(prefix.strip()))
    finally:
        await worker.stop(session_id)
    texts = [m["message"] for m in messages]
    assert any("with conda" in t for t in texts), texts  # "Building environment ... with conda"
    assert any(t.startswith("conda: ") for t in texts), texts
    assert not [m for m in messages if m["type"] == "warning"]
    # What the tool saw: its own config, none of the server's secrets or our settings.
    seen = dict(
        line.split("=", 1) for line in conda_server["probe"].read_text().splitlines() if "=" in line
    )
    assert seen["CONDARC"].endswith("condarc") and "HOME" in seen
    assert "DATABASE_PASSWORD" not in seen and "CONDA_CHANNEL_ALIAS" not in seen
    assert "CONDA_CACHE_DIR" not in seen


async def test_unsatisfiable_spec_fails_at_once_with_condas_message(conda_server):
    worker = conda_server["worker"]
    before = _env_dirs(conda_server["cache"])
    messages: list[dict] = []
    manifest = {"dependencies": ["python", "no-such-package-hcp"]}
    with pytest.raises(Exception) as raised:
        await worker.start(
            {"id": "unsatisfiable", "manifest": manifest, "progress_callback": messages.append}
        )
    text = str(raised.value)
    assert "PackagesNotFound" in text and "no-such-package-hcp" in text
    assert "offline-channel/conda-forge" in text  # the channels it looked in
    # No fallback to the embedded solver: the request is at fault, not conda.
    assert not any(m.get("stage") == "build:fallback" for m in messages)
    assert not any(m["message"].startswith("rattler:") for m in messages)
    assert _env_dirs(conda_server["cache"]) == before


async def test_cancelled_conda_build_leaves_no_prefix_and_no_process(conda_server):
    worker = conda_server["worker"]
    envs = conda_server["cache"] / "envs"
    before = _env_dirs(conda_server["cache"])
    # A spec no other test builds, so conda really runs.
    manifest = {"dependencies": ["python", "pandas", "numpy>=1"]}
    start = asyncio.ensure_future(worker.start({"id": "cancel-conda", "manifest": manifest}))
    for _ in range(600):  # until conda is running on our prefix
        if conda_processes(f"create --prefix {envs}/"):
            break
        assert not start.done(), start
        await asyncio.sleep(0.1)
    assert conda_processes(f"create --prefix {envs}/"), "conda never started"
    await worker.stop("cancel-conda")
    with pytest.raises(Exception, match="stopped while starting"):
        await start
    for _ in range(50):
        if not conda_processes(f"create --prefix {envs}/"):
            break
        await asyncio.sleep(0.1)
    assert conda_processes(f"create --prefix {envs}/") == []
    assert _env_dirs(conda_server["cache"]) == before
    assert not list(envs.glob(".*.specs.txt"))


# ------------------------------------------------------------------ the standalone worker


async def _standalone(
    hypha_server, offline_channel, real_conda, root: Path, tools: Path, pkgs: Path
) -> asyncio.subprocess.Process:
    token = await hypha_server.user_token("alice-ws")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HYPHA_", "CONDA_"))},
        **conda_home(root / "conda", real_conda, pkgs_dir=pkgs),
        "PATH": f"{tools}:/usr/bin:/bin",
        "HYPHA_TOKEN": token,
        "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
    }
    return await asyncio.create_subprocess_exec(
        *CLI,
        "--server-url",
        hypha_server.url,
        "--workspace",
        "alice-ws",
        "--service-id",
        root.name,
        "--package-manager",
        "auto",
        "--cache-dir",
        str(root / "cache"),
        "--working-dir",
        str(root / "work"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def _banner(process: asyncio.subprocess.Process) -> str:
    seen = ""
    while "registered as" not in seen:
        line = await asyncio.wait_for(process.stdout.readline(), 90)
        if not line:
            raise AssertionError(f"worker exited before registering:\n{seen}")
        seen += line.decode()
    return seen


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)


async def test_standalone_auto_worker_builds_with_conda(
    hypha_server, offline_channel, client, real_conda, session_tmp, conda_pkgs
):
    root = session_tmp / "pm-auto"
    tools = tool_folder(root, real_conda)
    process = await _standalone(hypha_server, offline_channel, real_conda, root, tools, conda_pkgs)
    try:
        banner = await _banner(process)
        assert "Package Manager: conda" in banner
        assert f"auto: conda found at {tools / 'conda'} (PATH)" in banner
        assert "Worker (using conda) registered as" in banner
        worker = await client.get_service("pm-auto")
        session_id = await worker.start({"manifest": {"dependencies": ["python", "numpy"]}})
        result = await worker.execute(session_id, "import sys; print(sys.prefix)")
        assert _built_by_conda(Path(result["outputs"][0]["text"].strip()))
        await worker.stop(session_id)
    finally:
        await _stop(process)


async def test_a_crashing_mamba_falls_back_to_conda_with_a_warning(
    hypha_server, offline_channel, client, real_conda, session_tmp, conda_pkgs
):
    root = session_tmp / "pm-fallback"
    tools = tool_folder(root, real_conda, crashing_mamba=True)  # the injected fault
    process = await _standalone(hypha_server, offline_channel, real_conda, root, tools, conda_pkgs)
    try:
        banner = await _banner(process)
        assert "Package Manager: mamba" in banner and "if it fails: conda" in banner
        worker = await client.get_service("pm-fallback")
        messages: list[dict] = []
        session_id = await worker.start(
            {
                "manifest": {"dependencies": ["python", "numpy"]},
                "progress_callback": messages.append,
            }
        )
        warnings = [m["message"] for m in messages if m["type"] == "warning"]
        assert len(warnings) == 1, messages
        assert warnings[0].startswith("mamba failed, so trying conda instead")
        assert "SIGSEGV" in warnings[0]
        result = await worker.execute(session_id, "import numpy, sys; print(sys.prefix)")
        prefix = Path(result["outputs"][0]["text"].strip())
        assert _built_by_conda(prefix)
        # What the crashed mamba left was removed before conda started.
        assert not (prefix / "half-built-by-mamba").exists()
        await worker.stop(session_id)
    finally:
        await _stop(process)
