"""End to end through a real Hypha server: clients call the worker over websockets, and
code runs in real ipykernels inside conda environments built from the offline channel."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from tests.conftest import WALKTHROUGH_DEPENDENCIES, env_folders

WALKTHROUGH_CELL = """
import numpy as np
import pandas as pd

data = np.array([1, 2, 3, 4, 5])
df = pd.DataFrame({'values': data})
print(f"Mean: {df['values'].mean()}")
print(f"Standard deviation: {df['values'].std()}")
print(f"Sum: {df['values'].sum()}")
"""


def _stdout(result: dict) -> str:
    return "".join(
        o["text"] for o in result["outputs"] if o["type"] == "stream" and o["name"] == "stdout"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


async def test_walkthrough_mean_std_sum(conda_worker, ready_session):
    result = await conda_worker.execute(ready_session, WALKTHROUGH_CELL, config={"timeout": 60})

    assert result["status"] == "ok", result
    text = _stdout(result)
    assert "Mean: 3.0" in text
    assert "Standard deviation: 1.58" in text
    assert "Sum: 15" in text
    assert result["error"] is None


async def test_direct_start_ignores_entry_point_with_a_warning(conda_worker):
    messages: list[dict] = []
    session_id = await conda_worker.start(
        {
            "id": "entry-ignored",
            "manifest": {
                "type": "conda-jupyter-kernel",
                "dependencies": WALKTHROUGH_DEPENDENCIES,
                "channels": ["conda-forge"],
                "entry_point": "main.py",
            },
            "progress_callback": messages.append,
        }
    )
    try:
        warnings = [m for m in messages if m["type"] == "warning"]
        assert any("main.py" in m["message"] for m in warnings), messages
        assert messages[-1]["type"] == "success"
        # Same dependencies as the shared session: the environment is reused, not rebuilt.
        info = await conda_worker.get_session_info(session_id)
        assert info["environment_reused"] is True
        assert info["status"] == "ready"
        result = await conda_worker.execute(session_id, "print('hello')")
        assert _stdout(result) == "hello\n"
    finally:
        await conda_worker.stop(session_id)


async def test_execute_result_has_data_and_count(conda_worker, ready_session):
    result = await conda_worker.execute(ready_session, "6 * 7")

    assert result["status"] == "ok"
    [item] = [o for o in result["outputs"] if o["type"] == "execute_result"]
    assert item["data"]["text/plain"] == "42"
    assert item["execution_count"] == result["execution_count"] >= 1


async def test_display_data(conda_worker, ready_session):
    code = "from IPython.display import display, HTML\ndisplay(HTML('<b>hi</b>'))"
    result = await conda_worker.execute(ready_session, code)

    [item] = [o for o in result["outputs"] if o["type"] == "display_data"]
    assert item["data"]["text/html"] == "<b>hi</b>"


async def test_name_error_is_reported_with_plain_traceback(conda_worker, ready_session):
    result = await conda_worker.execute(ready_session, "undefined_var + 1")

    assert result["status"] == "error"
    error = result["error"]
    assert error["ename"] == "NameError"
    assert "undefined_var" in error["evalue"]
    assert any("NameError" in line for line in error["traceback"])
    assert not any("\x1b[" in line for line in error["traceback"])


async def test_state_persists_between_cells_and_cwd_is_session_folder(
    conda_worker, ready_session, worker_dirs
):
    await conda_worker.execute(ready_session, "counter = 41")
    result = await conda_worker.execute(ready_session, "import os; print(counter + 1, os.getcwd())")

    value, cwd = _stdout(result).split()
    assert value == "42"
    assert Path(cwd).is_relative_to(worker_dirs["working"])


async def test_kernel_does_not_see_server_secrets(conda_worker, ready_session):
    result = await conda_worker.execute(
        ready_session, "import os, sys; print(*sorted(os.environ)); print(sys.prefix)"
    )
    names_line, prefix = _stdout(result).splitlines()
    names = set(names_line.split())
    # The server's process has these (its S3 keys come in as flags; tokens and Python
    # settings as variables in many deployments): none may reach user code.
    assert "DATABASE_PASSWORD" not in names  # set in the server's environment (conftest)
    assert not {n for n in names if n.startswith(("AWS_", "S3_", "JWT", "PYTHONPATH"))}
    assert "HYPHA_TOKEN" not in names  # a direct session carries no app token
    assert {"HYPHA_SERVER_URL", "HYPHA_WORKSPACE", "PATH", "HOME"} <= names
    assert "worker-cache" in prefix  # the kernel runs in the conda env, not the host


async def test_timeout_interrupts_and_session_survives(conda_worker, ready_session):
    started = time.monotonic()
    result = await conda_worker.execute(
        ready_session, "import time; time.sleep(60)", config={"timeout": 2}
    )
    elapsed = time.monotonic() - started

    assert result["status"] == "error"
    assert result["error"]["ename"] == "TimeoutError"
    assert elapsed < 20
    after = await conda_worker.execute(ready_session, "print('still here')")
    assert _stdout(after) == "still here\n"


async def test_input_returns_an_error_instead_of_hanging(conda_worker, ready_session):
    result = await conda_worker.execute(ready_session, "input('name? ')", config={"timeout": 30})
    assert result["status"] == "error"
    assert result["error"]["ename"] != "TimeoutError"


async def test_output_callback_streams_items(conda_worker, ready_session):
    seen: list[dict] = []
    result = await conda_worker.execute(
        ready_session, "print('a'); 1 + 1", output_callback=seen.append
    )
    assert result["status"] == "ok"
    assert [o["type"] for o in seen] == ["stream", "execute_result"]


async def test_get_logs_filters_and_pages(conda_worker, ready_session):
    await conda_worker.execute(ready_session, "print('log-marker-1'); print('log-marker-2')")

    everything = await conda_worker.get_logs(ready_session)
    assert everything["total"] == len(everything["items"]) > 0
    assert {"progress", "stdout"} <= {item["type"] for item in everything["items"]}

    stdout = await conda_worker.get_logs(ready_session, type="stdout")
    assert all(item["type"] == "stdout" for item in stdout["items"])
    assert any("log-marker-1" in item["content"] for item in stdout["items"])

    page = await conda_worker.get_logs(ready_session, type="stdout", offset=1, limit=1)
    assert page["items"] == stdout["items"][1:2]
    assert page["total"] == stdout["total"]

    with pytest.raises(Exception, match="Unknown log type"):
        await conda_worker.get_logs(ready_session, type="bogus")


async def test_stop_kills_kernel_and_removes_folder(conda_worker):
    session_id = await conda_worker.start(
        {"id": "to-stop", "manifest": {"dependencies": WALKTHROUGH_DEPENDENCIES}}
    )
    await conda_worker.execute(session_id, "open('scratch.txt', 'w').write('x')")
    info = await conda_worker.get_session_info(session_id)
    pid, folder = info["kernel_pid"], Path(info["working_dir"])
    assert _alive(pid) and (folder / "scratch.txt").exists()

    await conda_worker.stop(session_id)

    assert not folder.exists()
    for _ in range(50):
        if not _alive(pid):
            break
        await asyncio.sleep(0.1)
    assert not _alive(pid)
    with pytest.raises(Exception, match="No session 'to-stop'"):
        await conda_worker.execute(session_id, "1")
    assert session_id not in [s["session_id"] for s in await conda_worker.list_sessions()]


async def test_same_id_in_two_workspaces_names_two_sessions(conda_worker, other_client):
    bob_worker = await other_client.get_service("public/conda-worker")
    manifest = {"dependencies": WALKTHROUGH_DEPENDENCIES}
    alice = await conda_worker.start({"id": "same-id", "manifest": manifest})
    try:
        # Bob cannot see or use Alice's session...
        with pytest.raises(Exception, match="No session 'same-id' in workspace 'bob-ws'"):
            await bob_worker.execute("same-id", "1")
        with pytest.raises(Exception, match="No session"):
            await bob_worker.stop("same-id")
        assert "same-id" not in [s["session_id"] for s in await bob_worker.list_sessions()]
        # ...and his own session with the same id is a different one.
        bob = await bob_worker.start({"id": "same-id", "manifest": manifest})
        try:
            await conda_worker.execute(alice, "owner = 'alice'")
            await bob_worker.execute(bob, "owner = 'bob'")
            assert _stdout(await conda_worker.execute(alice, "print(owner)")) == "alice\n"
            assert _stdout(await bob_worker.execute(bob, "print(owner)")) == "bob\n"
        finally:
            await bob_worker.stop(bob)
    finally:
        await conda_worker.stop(alice)


async def test_duplicate_running_id_is_refused(conda_worker, ready_session):
    with pytest.raises(Exception, match="already ready"):
        await conda_worker.start(
            {"id": ready_session, "manifest": {"dependencies": WALKTHROUGH_DEPENDENCIES}}
        )


async def test_bad_manifest_gets_a_clear_error(conda_worker):
    with pytest.raises(Exception, match="'dependencies' must be a list"):
        await conda_worker.start({"manifest": {"dependencies": 42}})
    with pytest.raises(Exception, match="only mapping allowed is"):
        await conda_worker.start({"manifest": {"dependencies": [{"conda": ["x"]}]}})
    with pytest.raises(Exception, match="needs config\\['manifest'\\]"):
        await conda_worker.start({"id": "no-manifest"})


async def test_unknown_package_fails_cleanly_without_leftovers(conda_worker, worker_dirs):
    before = env_folders(worker_dirs)
    with pytest.raises(Exception, match="no-such-package-hcp"):
        await conda_worker.start(
            {"id": "bad-pkg", "manifest": {"dependencies": ["python", "no-such-package-hcp"]}}
        )
    after = env_folders(worker_dirs)
    assert after == before  # no half-built environment left to be reused
    info = await conda_worker.get_session_info("bad-pkg")
    assert info["status"] == "failed"
    logs = await conda_worker.get_logs("bad-pkg", type="error")
    assert any("no-such-package-hcp" in item["content"] for item in logs["items"])
    # A failed session can be started again under the same id once fixed.
    session_id = await conda_worker.start(
        {"id": "bad-pkg", "manifest": {"dependencies": WALKTHROUGH_DEPENDENCIES}}
    )
    await conda_worker.stop(session_id)
