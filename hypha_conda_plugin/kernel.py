"""One Jupyter kernel (ipykernel) for one session, driven by jupyter_client.

The worker lives inside the Hypha server's event loop, so everything here is
asynchronous: the kernel is an ``AsyncKernelManager`` child process, messages are read
from ZeroMQ with ``await``, liveness is polled with ``Popen.poll()`` (a non-blocking
``waitpid``) and what little file work there is runs in a thread.

Design notes (why, not what):

- The kernel spec is written into a private temporary folder (mode 0700) together with
  the connection file, the kernel's log (when no ``log_path`` is given) and its ZeroMQ
  sockets. The kernel talks over ``ipc`` sockets in that folder rather than TCP: no ports
  to race for when many kernels start at once, nothing reachable from the network, and
  only this user can open the folder (TCP on localhost is the fallback when the socket
  path would be too long, or off POSIX).
- ``execute`` reads IOPub itself until the kernel reports ``idle`` for our request
  instead of calling ``AsyncKernelClient.execute_interactive``. That helper cannot be
  resumed after its own timeout (we must keep reading after interrupting, to collect the
  output and the ``KeyboardInterrupt`` and to leave no stale messages for the next cell),
  it does not notice that the kernel died (it waits for the full timeout) and its output
  hook cannot be async. Our reader runs as one task, raced against the timeout and
  against the kernel process exiting.
- A cell that kills the kernel (``os._exit``, a segfault, the OOM killer) is the user's
  error: ``execute`` returns an error result with ``ename == "KernelDied"`` and the
  output printed before. Calling ``execute`` on a kernel that is already dead raises
  :class:`KernelDiedError`; the session layer can then ``restart()``.
- The kernel runs in its own session/process group (jupyter_client starts it with
  ``start_new_session=True``). Interrupts go to the whole group, as in Jupyter, and
  shutdown ends with ``SIGKILL`` to the group so that processes the user's code started
  do not outlive the session (a child that calls ``setsid`` itself can escape).
- What a cell's messages become for clients (the result contract: stream merging,
  displays, errors with plain tracebacks) is :mod:`hypha_conda_plugin.outputs`; this
  module only decides when a cell ended and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import zmq
import zmq.asyncio
from jupyter_client import AsyncKernelClient, AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

from hypha_conda_plugin.kernel_bootstrap import kernel_argv
from hypha_conda_plugin.outputs import (
    DEFAULT_MAX_OUTPUT_BYTES,
    CellOutputs,
    OutputCallback,
    strip_ansi,
)

logger = logging.getLogger(__name__)

SPEC_NAME = "hypha-conda"
# How long to wait for IOPub to echo a kernel_info request before asking again.
HANDSHAKE_RETRY = 0.1
# How often a running cell checks that the kernel process still exists.
LIVENESS_INTERVAL = 0.1
# After the kernel died mid-cell, read what it sent until quiet for this long (capped).
DEATH_DRAIN_QUIET = 0.1
DEATH_DRAIN = 1.0
# Graceful shutdown budget before jupyter_client escalates to SIGTERM, then SIGKILL.
SHUTDOWN_WAIT = 2.0
# Unix socket paths are limited to ~107 bytes; beyond that fall back to TCP on localhost.
IPC_PATH_LIMIT = 90
# After the shell reply, how long IOPub may take to deliver the cell's ``idle`` before the
# cell is finished without it (a message over the size limit drops the connection, and
# what it carried, ``idle`` included, is lost).
IDLE_AFTER_REPLY = 2.0
# Room for a message's headers and metadata beyond the output cap.
MESSAGE_SLACK = 1024 * 1024
# How much of the kernel's own output a start failure quotes.
LOG_TAIL_LINES = 40
LOG_TAIL_BYTES = 16_384


class KernelError(Exception):
    """Base class for kernel failures; messages are written for end users."""


class KernelStartError(KernelError):
    """The kernel process could not be started or never became ready."""


class KernelDiedError(KernelError):
    """The kernel is not running (it died or was shut down)."""


def _describe_exit(returncode: int | None, *, wrapped: bool = False) -> str:
    """Turn a return code into words, pointing at the OOM killer for SIGKILL.

    A wrapped kernel's code comes from bwrap, which reports a child killed by signal N
    as exit code 128 + N, as a shell does.
    """
    if returncode is None:
        return "exit status unknown"
    if wrapped and 128 < returncode < 128 + 65:
        returncode = 128 - returncode
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = "; possibly out of memory" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {returncode}"


async def _wait_for_exit(process: subprocess.Popen[bytes]) -> int | None:
    """Resolve when this exact process ends (it survives a restart of the manager)."""
    # Nothing to await on a Popen (it is not an asyncio subprocess), so poll it.
    while process.poll() is None:  # noqa: ASYNC110
        await asyncio.sleep(LIVENESS_INTERVAL)
    return process.returncode


async def _race(
    reader: asyncio.Task[dict[str, Any]], exited: asyncio.Task[Any], timeout: float | None
) -> Literal["reply", "exit", "timeout"]:
    """Wait for whichever comes first; a finished reply wins over a simultaneous exit."""
    done, _ = await asyncio.wait(
        {reader, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if reader in done:
        return "reply"
    if exited in done:
        return "exit"
    return "timeout"


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    """Cancel helper tasks and wait for them so nothing is left pending."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task


async def _handshake(client: AsyncKernelClient) -> None:
    """Ready means a ``kernel_info`` request was seen on IOPub, not just answered on shell.

    That proves our IOPub subscription is live, so no output of the first cell is lost.
    jupyter_client's ``wait_for_ready`` checks the same but then waits for 0.2 s of
    IOPub silence and polls liveness only once a second; this is ~40% of a start.
    Requests are repeated because a status published before we subscribed is gone.
    """
    while True:
        msg_id = client.kernel_info()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_iopub_echo(client, msg_id), HANDSHAKE_RETRY)
            return


async def _iopub_echo(client: AsyncKernelClient, msg_id: str) -> None:
    while True:
        msg = await client.get_iopub_msg()
        if msg["parent_header"].get("msg_id") == msg_id:
            return


_CONTEXTS: dict[int, zmq.asyncio.Context] = {}


def _shared_context(max_message_bytes: int) -> zmq.asyncio.Context:
    """One ZeroMQ context for all kernels (with the same output cap) of the process.

    jupyter_client gives every manager and every client a context of its own, each with
    an I/O thread: two threads per kernel inside the Hypha server. A shared context
    costs one. It also carries ``MAXMSGSIZE`` for every socket made from it: a kernel
    whose code sends one huge message (past the output cap, which the kernel bootstrap
    would have split) is disconnected by ZeroMQ before the message is ever held in the
    server's memory or parsed on its event loop.
    """
    context = _CONTEXTS.get(max_message_bytes)
    if context is None or context.closed:
        context = zmq.asyncio.Context()
        context.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        _CONTEXTS[max_message_bytes] = context
    return context


async def _iopub_until_idle(client: AsyncKernelClient, msg_id: str, cell: CellOutputs) -> None:
    while True:
        msg = await client.get_iopub_msg()
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return
        await cell.handle(msg)


async def _reopen_iopub(client: AsyncKernelClient) -> None:
    """A fresh IOPub connection after ZeroMQ dropped one for an oversized message.

    ZeroMQ treats that as a protocol error and never reconnects the socket, so without
    this every later cell of the session would run blind. jupyter_client makes a new
    channel when its attribute is empty (no public API for it); the handshake proves the
    new subscription is live before the next cell runs.
    """
    old = client._iopub_channel
    client._iopub_channel = None
    if old is not None:
        old.close()
    client.iopub_channel.start()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_handshake(client), 10)


async def _shell_reply(client: AsyncKernelClient, msg_id: str) -> dict[str, Any]:
    while True:
        reply = await client.get_shell_msg()
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]


#: Every process of a kernel carries this variable with the kernel's own id, so that what
#: is left of its process group is only killed if it really is the kernel's.
GROUP_MARKER_VARIABLE = "HYPHA_CONDA_KERNEL"


def _kill_group(pgid: int | None, marker: bytes) -> None:
    """SIGKILL what is left of the kernel's process group (user-started children).

    Only if a member of the group still carries the kernel's marker: once every member
    is gone the group's number is free, and a new, unrelated process may own it (runs in a
    thread: it reads ``/proc``).
    """
    if not hasattr(os, "killpg") or pgid is None or pgid <= 1 or pgid == os.getpgid(0):
        return
    if not _group_carries(pgid, marker):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _group_carries(pgid: int, marker: bytes) -> bool:
    """Whether some process of group ``pgid`` has ``marker`` in its environment."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if marker in handle.read().split(b"\0"):
                    return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def _read_log_tail(path: Path, offset: int) -> str:
    """The last lines the kernel wrote since it was launched (runs in a thread)."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(offset, size - LOG_TAIL_BYTES))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(strip_ansi(text).splitlines()[-LOG_TAIL_LINES:])


class Kernel:
    """One ipykernel process for one session, driven with jupyter_client's AsyncKernelManager.

    Executions are serialized with a lock (concurrent calls queue); ``interrupt``,
    ``restart`` and ``shutdown`` deliberately do not wait for it, because they are how a
    stuck cell gets unstuck. A Kernel is started once; after ``shutdown`` (or a failed
    ``start``) make a new one.
    """

    def __init__(
        self,
        python: Path,
        *,
        cwd: Path,
        env: Mapping[str, str],
        log_path: Path | None = None,
        interrupt_grace: float = 5.0,
        runtime_dir: Path | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        niceness: int = 0,
    ) -> None:
        """``runtime_dir``: an existing private folder for the kernelspec, connection
        file and sockets (its owner removes it); by default a temporary one is made.
        ``wrap`` turns the kernel's command line into a confined one (the sandbox); a
        wrapped kernel is interrupted by message, because a signal to the wrapper's
        process group would reach the wrapper rather than only the kernel."""
        # Absolute (the kernel runs in ``cwd``) but not resolved: resolving a venv's
        # ``bin/python`` symlink would lose the environment.
        self._python = Path(python).absolute()
        self._cwd = Path(cwd).absolute()
        kernel_id = uuid.uuid4().hex
        self._env = {**env, GROUP_MARKER_VARIABLE: kernel_id}
        self._marker = f"{GROUP_MARKER_VARIABLE}={kernel_id}".encode()
        self._log_path = Path(log_path) if log_path is not None else None
        # How long a timed-out cell may take to stop after SIGINT before we restart.
        self._interrupt_grace = interrupt_grace
        # A cell's output cap, applied by CellOutputs and (as a saving) in the kernel.
        self._max_output_bytes = max_output_bytes
        # CPU priority below the server's (see kernel_bootstrap).
        self._niceness = niceness
        self._km: AsyncKernelManager | None = None
        self._client: AsyncKernelClient | None = None
        self._runtime_dir = Path(runtime_dir) if runtime_dir is not None else None
        self._wrap = wrap
        self._preexec_fn = preexec_fn
        self._private_dir: Path | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        # Why we ended a given kernel pid ourselves, so a running cell can say so.
        self._stop_reasons: dict[int, str] = {}
        self._exec_lock = asyncio.Lock()
        self._life_lock = asyncio.Lock()

    # ------------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        """Pid of the current kernel process (kept after it dies, for diagnostics)."""
        provisioner = self._km.provisioner if self._km is not None else None
        return getattr(provisioner, "pid", None)

    @property
    def is_alive(self) -> bool:
        """Cheap and non-blocking: ``Popen.poll`` is a ``waitpid(WNOHANG)``."""
        process = self._process()
        return process is not None and process.poll() is None

    def _process(self) -> subprocess.Popen[bytes] | None:
        provisioner = self._km.provisioner if self._km is not None else None
        return getattr(provisioner, "process", None)

    def _exit_words(self, returncode: int | None) -> str:
        return _describe_exit(returncode, wrapped=self._wrap is not None)

    @property
    def _actual_log_path(self) -> Path:
        assert self._private_dir is not None
        return self._log_path or self._private_dir / "kernel.log"

    # ---------------------------------------------------------------- start-up

    async def start(self, timeout: float = 60.0) -> None:
        """Launch the kernel and wait until it answers ``kernel_info``.

        On failure everything is cleaned up and :class:`KernelStartError` carries the
        tail of the kernel's own output (a missing ipykernel, a broken environment...).
        """
        async with self._life_lock:
            if self._started:
                raise KernelError("This kernel was already started; create a new one.")
            self._started = True
            try:
                try:
                    await asyncio.to_thread(self._prepare_files)
                except OSError as exc:
                    raise KernelStartError(f"Could not prepare the kernel's files: {exc}") from exc
                self._km = self._make_manager()
                await self._launch(timeout)
            except BaseException:
                await self._teardown()
                raise

    def _prepare_files(self) -> None:
        """Private folder with the kernelspec; runs in a thread (file system work)."""
        if self._runtime_dir is not None:
            self._private_dir = self._runtime_dir
        else:
            self._private_dir = Path(tempfile.mkdtemp(prefix="hypha-kernel-"))
        spec_dir = self._private_dir / "kernels" / SPEC_NAME
        spec_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = kernel_argv(self._python, max_output=self._max_output_bytes, niceness=self._niceness)
        spec = {
            "argv": self._wrap(argv) if self._wrap is not None else argv,
            "display_name": f"Python ({self._python})",
            "language": "python",
            "interrupt_mode": "message" if self._wrap is not None else "signal",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
        log_path = self._actual_log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = log_path.open("ab")

    def _make_manager(self) -> AsyncKernelManager:
        """A manager that only sees our spec and keeps all its files in the private folder."""
        assert self._private_dir is not None
        specs = KernelSpecManager(
            kernel_dirs=[str(self._private_dir / "kernels")], ensure_native_kernel=False
        )
        km = AsyncKernelManager(
            kernel_name=SPEC_NAME,
            kernel_spec_manager=specs,
            context=_shared_context(self._max_output_bytes + MESSAGE_SLACK),
        )
        km.connection_file = str(self._private_dir / "connection.json")
        ipc_base = str(self._private_dir / "zmq")
        if os.name == "posix" and len(ipc_base) < IPC_PATH_LIMIT:
            km.transport = "ipc"
            km.ip = ipc_base
        km.shutdown_wait_time = SHUTDOWN_WAIT
        return km

    async def _launch(self, timeout: float) -> None:
        """Start the process (first start) and connect a fresh client."""
        assert self._km is not None
        self._mark_log()
        try:
            extra = {"preexec_fn": self._preexec_fn} if self._preexec_fn is not None else {}
            await self._km.start_kernel(
                cwd=str(self._cwd),
                env=self._env,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                **extra,
            )
        except Exception as exc:
            raise KernelStartError(f"Could not launch {self._python}: {exc}") from exc
        await self._connect(timeout)

    def _mark_log(self) -> None:
        """Remember where this launch's output starts, so failures quote only it.

        ``fstat`` rather than ``tell``: the kernel appends through its own descriptor.
        """
        assert self._log_file is not None
        self._log_offset = os.fstat(self._log_file.fileno()).st_size

    async def _connect(self, timeout: float) -> None:
        """Wait for the handshake, or for the process to exit (a broken env fails fast)."""
        assert self._km is not None
        process = self._process()
        assert process is not None
        client = self._km.client(context=self._km.context)
        # No heartbeat channel: it is a thread per kernel inside the host server, and kernel
        # death is noticed from the process itself (see _wait_for_exit). It also raced the
        # teardown of a kernel that died at start (ZMQError in the heartbeat thread).
        client.start_channels(hb=False)
        self._client = client
        ready = asyncio.create_task(_handshake(client))
        exited = asyncio.create_task(_wait_for_exit(process))
        try:
            done, _ = await asyncio.wait(
                {ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if ready in done:
                ready.result()
                return
        finally:
            await _cancel(ready, exited)
        reason = f"it did not answer within {timeout:g} s"
        raise KernelStartError(await self._start_failure_message(reason))

    async def _start_failure_message(self, reason: str) -> str:
        if not self.is_alive:
            process = self._process()
            returncode = process.returncode if process is not None else None
            reason = f"the kernel process exited ({self._exit_words(returncode)})"
        tail = await self.log_tail()
        message = f"The kernel ({self._python}) did not start: {reason}."
        if tail:
            message += f"\nLast lines of the kernel's output:\n{tail}"
        return message

    async def log_tail(self) -> str:
        """The last lines the kernel process itself wrote (not a cell's outputs): what a
        user needs when a kernel misbehaves, e.g. an entry point that hangs at start."""
        if self._private_dir is None:
            return ""
        return await asyncio.to_thread(_read_log_tail, self._actual_log_path, self._log_offset)

    # --------------------------------------------------------------- execution

    async def execute(
        self,
        code: str,
        *,
        timeout: float | None = None,
        output_callback: OutputCallback | None = None,
        silent: bool = False,
    ) -> dict[str, Any]:
        """Run one cell and return the contract result.

        ``silent``: the worker's own code (session set-up): no history, no execution
        count, nothing shown to the session's clients.

        ``timeout`` counts from when the cell is sent (not time spent queued behind
        other cells). On timeout the kernel is interrupted and keeps its state; if it
        does not stop within ``interrupt_grace`` seconds it is restarted.
        """
        async with self._exec_lock:
            async with self._life_lock:  # a restart in progress finishes first
                client, process = self._running()
            cell = CellOutputs(output_callback, max_bytes=self._max_output_bytes)
            # stop_on_error=False: cells never queue in the kernel (the lock), except
            # right after a cancelled execute, whose interrupted cell would otherwise
            # make the kernel abort this one.
            msg_id = client.execute(
                code,
                silent=silent,
                store_history=not silent,
                allow_stdin=False,
                stop_on_error=False,
            )
            reader = asyncio.create_task(self._read_cell(client, msg_id, cell))
            exited = asyncio.create_task(_wait_for_exit(process))
            try:
                return await self._supervise(cell, reader, exited, process, timeout)
            except asyncio.CancelledError:
                await self._interrupt_quietly(process)
                raise
            finally:
                await _cancel(reader, exited)

    def _running(self) -> tuple[AsyncKernelClient, subprocess.Popen[bytes]]:
        """The client and process a cell runs on, or the reason it cannot run."""
        if not self._started:
            raise KernelError("The kernel has not been started.")
        process = self._process()
        if self._closing is not None or self._client is None or process is None:
            raise KernelDiedError("The kernel has been shut down.")
        if process.poll() is not None:
            raise KernelDiedError(
                f"The kernel is not running ({self._exit_words(process.returncode)}); "
                "restart it to continue."
            )
        return self._client, process

    @staticmethod
    async def _read_cell(
        client: AsyncKernelClient, msg_id: str, cell: CellOutputs
    ) -> dict[str, Any]:
        """Collect IOPub output until ``idle`` for our request, and the shell reply.

        Normally ``idle`` follows the reply within milliseconds. If it does not come
        (ZeroMQ dropped IOPub under a message over the size limit, and the messages
        with it), the cell is finished on the reply alone and says output was lost.
        """
        outputs = asyncio.ensure_future(_iopub_until_idle(client, msg_id, cell))
        reply = asyncio.ensure_future(_shell_reply(client, msg_id))
        try:
            done, _ = await asyncio.wait({outputs, reply}, return_when=asyncio.FIRST_COMPLETED)
            if outputs in done:
                outputs.result()
                return await reply
            await asyncio.wait({outputs}, timeout=IDLE_AFTER_REPLY)
            if outputs.done():
                outputs.result()
                return reply.result()
            cell.mark_lost()
        finally:
            await _cancel(outputs, reply)
        await _reopen_iopub(client)
        return reply.result()

    async def _supervise(
        self,
        cell: CellOutputs,
        reader: asyncio.Task[dict[str, Any]],
        exited: asyncio.Task[Any],
        process: subprocess.Popen[bytes],
        timeout: float | None,
    ) -> dict[str, Any]:
        """Decide how the cell ended: reply, kernel death, or timeout (then interrupt)."""
        outcome = await _race(reader, exited, timeout)
        if outcome == "reply":
            return self._finish(cell, reader, process)
        if outcome == "exit":
            return await self._died(cell, reader, process)

        assert timeout is not None
        await self._interrupt_quietly(process)
        outcome = await _race(reader, exited, self._interrupt_grace)
        if outcome == "exit":
            return await self._died(cell, reader, process)
        if outcome == "reply":
            result = self._finish(cell, reader, process)
            if result["status"] == "ok":  # it finished just as the timeout hit
                return result
            return cell.failure(
                "TimeoutError",
                f"The cell ran longer than {timeout:g} s and was interrupted. "
                "The kernel kept its state.",
            )
        await self._restart_after_timeout(process)
        return cell.failure(
            "TimeoutError",
            f"The cell ran longer than {timeout:g} s and did not stop within "
            f"{self._interrupt_grace:g} s of being interrupted, so the kernel was restarted; "
            "its state (variables, imports) is lost.",
        )

    def _finish(
        self,
        cell: CellOutputs,
        reader: asyncio.Task[dict[str, Any]],
        process: subprocess.Popen[bytes],
    ) -> dict[str, Any]:
        """A reader that failed because we closed its sockets means the kernel went away."""
        if not reader.cancelled() and reader.exception() is None:
            return cell.from_reply(reader.result())
        reason = self._stop_reasons.get(process.pid)
        if reason is not None or process.poll() is not None:
            return self._died_result(cell, process)
        error = None if reader.cancelled() else reader.exception()
        raise KernelError(f"Lost contact with the kernel: {error or 'channel closed'}")

    async def _died(
        self,
        cell: CellOutputs,
        reader: asyncio.Task[dict[str, Any]],
        process: subprocess.Popen[bytes],
    ) -> dict[str, Any]:
        """The process ended under the cell; reap what the user's code left in its group.

        Output the kernel sent just before dying may still sit in our socket, so the
        reader gets a moment to drain it (until it goes quiet, at most DEATH_DRAIN).
        """
        deadline = asyncio.get_running_loop().time() + DEATH_DRAIN
        while not reader.done() and asyncio.get_running_loop().time() < deadline:
            seen = cell.messages_seen
            await asyncio.wait({reader}, timeout=DEATH_DRAIN_QUIET)
            if cell.messages_seen == seen:
                break
        if process.pid not in self._stop_reasons:
            pgid = getattr(self._km.provisioner, "pgid", None) if self._km else None
            await asyncio.to_thread(_kill_group, pgid, self._marker)
        return self._died_result(cell, process)

    def _died_result(self, cell: CellOutputs, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        reason = self._stop_reasons.get(process.pid)
        if reason is not None:
            message = f"The kernel was {reason} while this cell was running."
        else:
            message = (
                f"The kernel died while running this cell ({self._exit_words(process.poll())}). "
                "Its state is lost; restart the kernel to continue."
            )
        return cell.failure("KernelDied", message)

    async def _interrupt_quietly(self, process: subprocess.Popen[bytes]) -> None:
        """Best effort SIGINT to the kernel that runs this cell (and not a newer one)."""
        if self._km is None or self._process() is not process or process.poll() is not None:
            return
        try:
            await self._km.interrupt_kernel()
        except Exception:
            logger.exception("Could not interrupt kernel %s", process.pid)

    async def _restart_after_timeout(self, process: subprocess.Popen[bytes]) -> None:
        """Only restart if nobody else restarted or shut the kernel down meanwhile."""
        if self._closing is None and self._process() is process:
            await self.restart()

    # ---------------------------------------------------------------- control

    async def interrupt(self) -> None:
        """Send SIGINT to the kernel's process group; the running cell gets KeyboardInterrupt."""
        _, process = self._running()
        assert self._km is not None
        await self._km.interrupt_kernel()
        logger.debug("Interrupted kernel %s", process.pid)

    async def restart(self, timeout: float = 60.0) -> None:
        """Kill the kernel and its process group, start a fresh one, reconnect.

        A cell running meanwhile returns a ``KernelDied`` error saying it was restarted.
        """
        async with self._life_lock:
            if not self._started or self._km is None or self._closing is not None:
                raise KernelError("Cannot restart a kernel that is not running.")
            if self.pid is not None:
                self._stop_reasons[self.pid] = "restarted"
            self._close_client()
            self._mark_log()
            try:
                await self._km.restart_kernel(now=True)
            except Exception as exc:
                message = await self._start_failure_message(str(exc))
                raise KernelStartError(message) from exc
            await self._connect(timeout)

    async def shutdown(self) -> None:
        """Stop the kernel and everything in its process group; remove its files.

        Idempotent, and shielded from cancellation so no process is left behind.
        """
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown_once())
        await asyncio.shield(self._closing)

    async def _shutdown_once(self) -> None:
        async with self._life_lock:
            await self._teardown()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.stop_channels()
            self._client = None

    async def _teardown(self) -> None:
        """Graceful shutdown, then SIGKILL the group; never raises."""
        km = self._km
        pgid = getattr(km.provisioner, "pgid", None) if km is not None else None
        if self.pid is not None:
            self._stop_reasons[self.pid] = "shut down"
        self._close_client()
        if km is not None:
            await self._stop_manager(km)
        await asyncio.to_thread(_kill_group, pgid, self._marker)
        self._km = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._private_dir is not None and self._runtime_dir is None:
            await asyncio.to_thread(shutil.rmtree, self._private_dir, True)
        self._private_dir = None

    @staticmethod
    async def _stop_manager(km: AsyncKernelManager) -> None:
        """Ask politely (atexit handlers run), escalate to killing if anything goes wrong."""
        try:
            if km.has_kernel:
                await km.shutdown_kernel(now=False)
            else:
                await km.cleanup_resources()
        except Exception:
            logger.exception("Graceful kernel shutdown failed; killing it")
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)
