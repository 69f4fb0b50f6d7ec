"""Real kernels, no mocks: the behaviour sessions rely on, timed where time is the point.

One kernel is shared by the tests that do not care about its state (module fixture);
tests that kill, restart or wedge a kernel start their own. Kernels run in the bubblewrap
sandbox, as sessions do, wherever this machine allows it (``CONDA_SANDBOX=auto``); the
start-failure tests run fake interpreters directly.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hypha_conda_plugin.instances import Instance
from hypha_conda_plugin.kernel import (
    Kernel,
    KernelDiedError,
    KernelError,
    KernelStartError,
)
from hypha_conda_plugin.outputs import strip_ansi
from hypha_conda_plugin.sandbox import Sandbox, detect_sandbox

pytestmark = pytest.mark.timeout(60)

MARKER = "hypha-kernel-test-marker"


def _env(**extra: str) -> dict[str, str]:
    """A small explicit environment, as the session layer will pass."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(Path.home()), **extra}


def _gone(pid: int) -> bool:
    """A pid is gone when it does not exist or is an unreaped zombie (it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        await asyncio.sleep(0.05)
    return _gone(pid)


def _text(result: dict[str, Any], name: str = "stdout") -> str:
    return "".join(
        o["text"] for o in result["outputs"] if o["type"] == "stream" and o["name"] == name
    )


@pytest.fixture(scope="module")
async def sandbox() -> Sandbox:
    return await detect_sandbox("auto")


def _confined(
    sandbox: Sandbox, python: Path, folder: Path, env: dict[str, str], **options: Any
) -> Kernel:
    """A kernel as sessions get one: in an instance folder, inside the sandbox."""
    instance = Instance(folder)
    instance.create(None)
    prefix = python.parent.parent

    def wrap(argv: list[str]) -> list[str]:
        return sandbox.command(
            argv,
            instance_root=instance.root,
            tmp_dir=instance.tmp,
            passwd_file=instance.passwd_file,
            read_only=[prefix],
            cwd=instance.work,
        )

    return Kernel(
        python,
        cwd=instance.work,
        env=env,
        runtime_dir=instance.kernel_dir,
        wrap=wrap if sandbox.enabled else None,
        **options,
    )


@pytest.fixture(scope="module")
def kernel_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-instance")


@pytest.fixture(scope="module")
async def kernel(
    kernel_python: Path, kernel_folder: Path, sandbox: Sandbox
) -> AsyncIterator[Kernel]:
    k = _confined(
        sandbox,
        kernel_python,
        kernel_folder,
        _env(HYPHA_TEST_MARKER=MARKER),
        log_path=kernel_folder.parent / "shared-kernel.log",
    )
    await k.start()
    yield k
    await k.shutdown()


@pytest.fixture
async def own_kernel(
    kernel_python: Path, tmp_path: Path, sandbox: Sandbox
) -> AsyncIterator[Kernel]:
    """A kernel a test may kill, wedge or restart; short interrupt grace keeps tests fast."""
    k = _confined(sandbox, kernel_python, tmp_path / "i", _env(), interrupt_grace=1.0)
    await k.start()
    yield k
    await k.shutdown()


# --------------------------------------------------------------------------- outputs


async def test_streams_are_merged_per_stream(kernel: Kernel) -> None:
    code = (
        "import sys\n"
        "for i in range(3):\n"
        "    print('out', i, flush=True)\n"
        "print('err', file=sys.stderr, flush=True)\n"
    )
    result = await kernel.execute(code)
    assert result["status"] == "ok"
    assert result["error"] is None
    assert [(o["type"], o["name"]) for o in result["outputs"]] == [
        ("stream", "stdout"),
        ("stream", "stderr"),
    ]
    assert _text(result) == "out 0\nout 1\nout 2\n"
    assert _text(result, "stderr") == "err\n"


async def test_execute_result_carries_execution_count(kernel: Kernel) -> None:
    result = await kernel.execute("6 * 7")
    assert result["status"] == "ok"
    (item,) = result["outputs"]
    assert item["type"] == "execute_result"
    assert item["data"]["text/plain"] == "42"
    assert item["execution_count"] == result["execution_count"]
    assert isinstance(result["execution_count"], int) and result["execution_count"] > 0
    later = await kernel.execute("None")
    assert later["execution_count"] == result["execution_count"] + 1
    assert later["outputs"] == []


async def test_display_data(kernel: Kernel) -> None:
    result = await kernel.execute(
        "from IPython.display import display, HTML; display(HTML('<b>x</b>'))"
    )
    assert result["status"] == "ok"
    (item,) = result["outputs"]
    assert item["type"] == "display_data"
    assert item["data"]["text/html"] == "<b>x</b>"
    assert "metadata" in item


async def test_update_display_and_clear_output(kernel: Kernel) -> None:
    updated = await kernel.execute(
        "from IPython.display import display\n"
        "h = display('first', display_id=True)\n"
        "h.update('second')\n"
    )
    (item,) = updated["outputs"]
    assert item["type"] == "display_data"
    assert item["data"]["text/plain"] == "'second'"

    cleared = await kernel.execute(
        "from IPython.display import clear_output\n"
        "print('gone', flush=True)\n"
        "clear_output()\n"
        "print('kept', flush=True)\n"
    )
    assert cleared["outputs"] == [{"type": "stream", "name": "stdout", "text": "kept\n"}]


async def test_error_result_has_plain_traceback(kernel: Kernel) -> None:
    result = await kernel.execute("print('before', flush=True)\nundefined_name_xyz")
    assert result["status"] == "error"
    error = result["error"]
    assert error["ename"] == "NameError"
    assert "undefined_name_xyz" in error["evalue"]
    assert error["traceback"] and all(isinstance(line, str) for line in error["traceback"])
    assert not any("\x1b" in line for line in error["traceback"])
    assert any("undefined_name_xyz" in line for line in error["traceback"])
    # The error is reported once, in "error"; outputs only hold what the cell printed.
    assert result["outputs"] == [{"type": "stream", "name": "stdout", "text": "before\n"}]


def test_strip_ansi() -> None:
    colored = "\x1b[0;31mNameError\x1b[0m: \x1b]8;;file:///x.py\x1b\\x.py\x1b]8;;\x1b\\"
    assert strip_ansi(colored) == "NameError: x.py"


# ------------------------------------------------------------------ environment


async def test_cwd_and_env_are_honoured(kernel: Kernel, kernel_folder: Path) -> None:
    result = await kernel.execute(
        "import os; print(os.getcwd()); print(os.environ['HYPHA_TEST_MARKER'])"
    )
    assert result["status"] == "ok", result
    cwd, marker = _text(result).splitlines()
    assert Path(cwd) == Instance(kernel_folder).work
    assert marker == MARKER


async def test_connection_file_is_private(kernel: Kernel) -> None:
    private = kernel._private_dir
    assert private is not None
    assert private.stat().st_mode & 0o777 == 0o700
    assert (private / "connection.json").exists()


async def test_input_fails_fast(kernel: Kernel) -> None:
    start = time.monotonic()
    result = await kernel.execute("input('name? ')", timeout=20)
    assert time.monotonic() - start < 3
    assert result["status"] == "error"
    assert result["error"]["ename"] == "StdinNotImplementedError"


# ---------------------------------------------------------------- time and state


async def test_timeout_interrupts_and_keeps_state(kernel: Kernel) -> None:
    await kernel.execute("kept_value = 1234")
    start = time.monotonic()
    result = await kernel.execute(
        "import time\nprint('started', flush=True)\ntime.sleep(60)", timeout=1.0
    )
    elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 3.0
    assert result["status"] == "error"
    assert result["error"]["ename"] == "TimeoutError"
    assert "1 s" in result["error"]["evalue"]
    assert "interrupted" in result["error"]["evalue"]
    assert _text(result) == "started\n"
    after = await kernel.execute("kept_value")
    assert after["status"] == "ok"
    assert after["outputs"][0]["data"]["text/plain"] == "1234"


async def test_interrupt_stops_running_cell(kernel: Kernel) -> None:
    task = asyncio.create_task(kernel.execute("import time; time.sleep(60)"))
    await asyncio.sleep(0.5)
    start = time.monotonic()
    await kernel.interrupt()
    result = await asyncio.wait_for(task, 5)
    assert time.monotonic() - start < 2
    assert result["error"]["ename"] == "KeyboardInterrupt"


async def test_concurrent_executes_are_serialized(kernel: Kernel) -> None:
    await kernel.execute("counter = 0")
    results = await asyncio.gather(
        kernel.execute("import time; time.sleep(0.2); counter += 1; counter"),
        *(kernel.execute("counter += 1; counter") for _ in range(9)),
    )
    values = [int(r["outputs"][0]["data"]["text/plain"]) for r in results]
    assert values == list(range(1, 11))
    counts = [r["execution_count"] for r in results]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


async def test_output_callback_sees_items_in_order(kernel: Kernel) -> None:
    seen: list[dict[str, Any]] = []
    code = (
        "from IPython.display import display\n"
        "print('one', flush=True)\n"
        "display('two')\n"
        "print('three', flush=True)\n"
        "'four'"
    )
    result = await kernel.execute(code, output_callback=seen.append)
    assert [o["type"] for o in seen] == [o["type"] for o in result["outputs"]]
    assert [o["type"] for o in seen] == ["stream", "display_data", "stream", "execute_result"]
    assert seen[0]["text"] == "one\n" and seen[2]["text"] == "three\n"

    sync_seen: list[str] = []
    await kernel.execute(
        "print('sync', flush=True)", output_callback=lambda i: sync_seen.append(i["text"])
    )
    assert sync_seen == ["sync\n"]


async def test_failing_output_callback_does_not_break_the_cell(kernel: Kernel) -> None:
    def broken(item: dict[str, Any]) -> None:
        raise RuntimeError("client went away")

    result = await kernel.execute("print('still fine')", output_callback=broken)
    assert result["status"] == "ok"
    assert _text(result) == "still fine\n"


# ----------------------------------------------------------- death and restarts


async def test_kernel_death_is_reported_quickly(own_kernel: Kernel) -> None:
    await own_kernel.execute("lost = 1")
    start = time.monotonic()
    # os._exit does not let the kernel's ZeroMQ queue drain, so give 'bye' time to leave.
    result = await own_kernel.execute(
        "import os, time\nprint('bye', flush=True)\ntime.sleep(0.2)\nos._exit(3)", timeout=30
    )
    assert time.monotonic() - start < 3
    assert result["status"] == "error"
    assert result["error"]["ename"] == "KernelDied"
    assert "exit code 3" in result["error"]["evalue"]
    assert _text(result) == "bye\n"
    assert not own_kernel.is_alive
    with pytest.raises(KernelDiedError):
        await own_kernel.execute("1")

    old_pid = own_kernel.pid
    await own_kernel.restart()
    assert own_kernel.is_alive and own_kernel.pid != old_pid
    fresh = await own_kernel.execute("'lost' in globals()")
    assert fresh["outputs"][0]["data"]["text/plain"] == "False"


async def test_unresponsive_interrupt_restarts_kernel(own_kernel: Kernel) -> None:
    old_pid = own_kernel.pid
    assert old_pid is not None
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    start = time.monotonic()
    result = await own_kernel.execute(code, timeout=0.5)
    assert time.monotonic() - start < 6
    assert result["error"]["ename"] == "TimeoutError"
    assert "restarted" in result["error"]["evalue"]
    assert own_kernel.is_alive and own_kernel.pid != old_pid
    assert await _wait_gone(old_pid)
    after = await own_kernel.execute("1 + 1")
    assert after["status"] == "ok"


async def test_restart_during_cell_returns_error(own_kernel: Kernel) -> None:
    task = asyncio.create_task(own_kernel.execute("import time; time.sleep(60)"))
    await asyncio.sleep(0.3)
    await own_kernel.restart()
    result = await asyncio.wait_for(task, 5)
    assert result["error"]["ename"] == "KernelDied"
    assert "restarted" in result["error"]["evalue"]
    assert (await own_kernel.execute("2"))["status"] == "ok"

    # A cell submitted while a restart is in progress waits for it, then runs.
    restarting = asyncio.create_task(own_kernel.restart())
    await asyncio.sleep(0.05)
    queued = await own_kernel.execute("'after restart'")
    await restarting
    assert queued["status"] == "ok"
    assert queued["execution_count"] == 1


def _pid_of(cmdline: list[str]) -> int | None:
    """The host pid of the process running exactly ``cmdline`` (pids inside the sandbox
    are those of its own namespace, so a cell cannot tell us)."""
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] == cmdline:
            return process.pid
    return None


@pytest.mark.parametrize("confined", [True, False], ids=["sandbox", "plain"])
async def test_shutdown_leaves_no_process_behind(
    kernel_python: Path, tmp_path: Path, sandbox: Sandbox, confined: bool
) -> None:
    k = (
        _confined(sandbox, kernel_python, tmp_path / "i", _env())
        if confined
        else Kernel(kernel_python, cwd=tmp_path, env=_env())
    )
    await k.start()
    # A grandchild in a session of its own that ignores SIGINT/SIGTERM/SIGHUP: only the
    # group SIGKILL (or the sandbox's PID namespace going away) ends it.
    duration = f"1000.{os.getpid()}{time.monotonic_ns() % 10**6}"
    result = await k.execute(
        "import subprocess\n"
        "p = subprocess.Popen(['sh', '-c', \"trap '' INT TERM HUP; exec sleep "
        + duration
        + '"])\nprint(p.pid)'
    )
    assert result["status"] == "ok", result
    child = None
    for _ in range(50):
        child = _pid_of(["sleep", duration])
        if child:
            break
        await asyncio.sleep(0.05)
    kernel_pid = k.pid
    private = k._private_dir
    assert child is not None and kernel_pid is not None and private is not None
    assert not _gone(child) and not _gone(kernel_pid)

    await k.shutdown()
    await k.shutdown()  # idempotent
    assert await _wait_gone(kernel_pid)
    assert await _wait_gone(child)
    assert not k.is_alive and k.pid is None
    if not confined:  # its own temporary folder; an instance's folder is its owner's
        assert not private.exists()
    with pytest.raises(KernelDiedError):
        await k.execute("1")


async def test_execute_before_start_is_an_error(kernel_python: Path, tmp_path: Path) -> None:
    k = Kernel(kernel_python, cwd=tmp_path, env=_env())
    with pytest.raises(KernelError):
        await k.execute("1")
    await k.shutdown()


# -------------------------------------------------------------- start failures


async def test_start_failure_quotes_kernel_output(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'ModuleNotFoundError: No module named ipykernel' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    log = tmp_path / "logs" / "kernel.log"
    log.parent.mkdir()
    log.write_text("earlier session output\n")
    k = Kernel(fake, cwd=tmp_path, env=_env(), log_path=log)
    start = time.monotonic()
    with pytest.raises(KernelStartError) as info:
        await k.start(timeout=20)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "No module named ipykernel" in message
    assert "exit code 1" in message
    assert "earlier session output" not in message
    assert "No module named ipykernel" in log.read_text()  # appended, not replaced
    assert log.read_text().startswith("earlier session output")
    assert not k.is_alive
    await k.shutdown()


async def test_start_with_missing_python(tmp_path: Path) -> None:
    k = Kernel(tmp_path / "no-such-python", cwd=tmp_path, env=_env())
    with pytest.raises(KernelStartError, match="no-such-python"):
        await k.start()
    await k.shutdown()


async def test_start_timeout_kills_the_process(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "pid=$$" >&2\nexec sleep 30\n')
    fake.chmod(0o755)
    k = Kernel(fake, cwd=tmp_path, env=_env())
    with pytest.raises(KernelStartError, match="pid=") as info:
        await k.start(timeout=1)
    pid = int(str(info.value).rsplit("pid=", 1)[1].split()[0])
    assert await _wait_gone(pid)
    await k.shutdown()


async def test_cancelled_execute_interrupts_the_cell(kernel: Kernel) -> None:
    task = asyncio.create_task(kernel.execute("import time; time.sleep(60)"))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    start = time.monotonic()
    result = await kernel.execute("'free'", timeout=5)
    assert time.monotonic() - start < 2
    assert result["status"] == "ok"


async def test_shutdown_during_cell_returns_promptly(own_kernel: Kernel) -> None:
    task = asyncio.create_task(own_kernel.execute("import time; time.sleep(60)"))
    await asyncio.sleep(0.3)
    await own_kernel.shutdown()
    result = await asyncio.wait_for(task, 5)
    assert result["status"] == "error"
    assert result["error"]["ename"] in ("KernelDied", "KeyboardInterrupt")


def test_a_process_group_is_killed_only_while_it_is_the_kernels() -> None:
    """A group number is free once its last member is gone, and may then belong to
    someone else: teardown kills a group only if a member carries the kernel's marker."""
    import subprocess

    from hypha_conda_plugin.kernel import GROUP_MARKER_VARIABLE, _kill_group

    marker = f"{GROUP_MARKER_VARIABLE}=k-{os.getpid()}"
    foreign = subprocess.Popen(["sleep", "30"], start_new_session=True)
    ours = subprocess.Popen(
        ["sleep", "30"],
        start_new_session=True,
        env={**os.environ, GROUP_MARKER_VARIABLE: f"k-{os.getpid()}"},
    )
    try:
        _kill_group(foreign.pid, marker.encode())
        _kill_group(ours.pid, marker.encode())
        assert ours.wait(5) == -9
        assert foreign.poll() is None  # not ours: left alone
    finally:
        foreign.kill()
        ours.kill()
        foreign.wait()
        ours.wait()
