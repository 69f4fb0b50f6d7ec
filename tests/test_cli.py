"""The standalone worker CLI: clear errors for missing settings, and a real registration
with a running Hypha server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import WALKTHROUGH_DEPENDENCIES

CLI = [sys.executable, "-m", "hypha_conda_plugin"]


def _error_line(stderr: str) -> str:
    """argparse prints usage first; the error itself is the line after it."""
    return next(line for line in stderr.splitlines() if "error:" in line)


def _env_without_hypha() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("HYPHA_", "CONDA_"))}


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        ([], ["--server-url", "--workspace", "--token"]),
        (["--server-url", "http://127.0.0.1:1"], ["--workspace", "--token"]),
        (["--server-url", "http://x", "--workspace", "ws"], ["--token"]),
    ],
)
def test_missing_settings_exit_nonzero_and_name_them(args, missing):
    done = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=_env_without_hypha(), timeout=60
    )
    assert done.returncode == 2
    error = _error_line(done.stderr)
    for flag in missing:
        assert flag in error
    assert "HYPHA_TOKEN" in error or "--token" not in missing


def test_hypha_variables_stand_in_for_flags():
    env = {**_env_without_hypha(), "HYPHA_SERVER_URL": "http://x", "HYPHA_WORKSPACE": "ws"}
    done = subprocess.run(CLI, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    error = _error_line(done.stderr)
    assert "--token" in error and "--server-url" not in error


def test_unreachable_server_is_a_clear_error(tmp_path):
    done = subprocess.run(
        CLI
        + [
            "--server-url",
            "http://127.0.0.1:9",
            "--workspace",
            "ws",
            "--token",
            "t",
            "--cache-dir",
            str(tmp_path / "c"),
            "--working-dir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        env=_env_without_hypha(),
        timeout=120,
    )
    assert done.returncode == 1
    assert "could not connect to http://127.0.0.1:9" in done.stderr


async def test_standalone_worker_registers_runs_code_and_stops(
    hypha_server, offline_channel, client, tmp_path
):
    token = await hypha_server.user_token("alice-ws")
    env = {
        **_env_without_hypha(),
        "HYPHA_TOKEN": token,  # from the environment, the rest from flags
        "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
    }
    process = await asyncio.create_subprocess_exec(
        *CLI,
        "--server-url",
        hypha_server.url,
        "--workspace",
        "alice-ws",
        "--service-id",
        "cli-worker",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--working-dir",
        str(tmp_path / "work"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        banner = await asyncio.wait_for(_read_until(process, "registered as"), 60)
        assert "alice-ws" in banner
        worker = await client.get_service("cli-worker")
        session_id = await worker.start({"manifest": {"dependencies": WALKTHROUGH_DEPENDENCIES}})
        result = await worker.execute(session_id, "import numpy; print(numpy.arange(4).sum())")
        assert result["outputs"][0]["text"] == "6\n"
        work = tmp_path / "work"
        assert any(work.rglob("*")), "session folder should exist while running"
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 60)
    assert code == 0
    # Stopping the worker stopped its sessions and removed their folders.
    assert not [p for p in (tmp_path / "work").rglob("*") if p.is_file()]


async def _read_until(process: asyncio.subprocess.Process, marker: str) -> str:
    seen = ""
    while marker not in seen:
        line = await process.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited before '{marker}':\n{seen}")
        seen += line.decode()
    return seen


def test_channel_build_prints_the_alias_and_reuses_a_built_channel(offline_channel):
    from tests.conftest import CACHE, CHANNEL_REQUIREMENTS

    done = subprocess.run(
        [*CLI, "channel", "build", str(CACHE / "offline-channel"), *CHANNEL_REQUIREMENTS],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env_without_hypha(),
    )
    assert done.returncode == 0, done.stderr
    assert f"export CONDA_CHANNEL_ALIAS={offline_channel.alias_url}" in done.stdout
    assert f"({len(offline_channel.packages)} packages)" in done.stdout


def test_channel_build_names_a_requirement_that_does_not_exist(tmp_path):
    done = subprocess.run(
        [*CLI, "channel", "build", str(tmp_path / "ch"), "no-such-dist-hcp-xyz"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env_without_hypha(),
    )
    assert done.returncode == 1
    assert "no-such-dist-hcp-xyz" in done.stderr
