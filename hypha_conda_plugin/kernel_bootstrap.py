"""How a kernel process is launched: ipykernel, with printed output kept small at the source.

ipykernel buffers what a cell prints and sends it every 0.2 s as one IOPub message. A
cell printing fast (``for _ in range(200): print("x" * 10**6)``) therefore sends a few
messages of a hundred megabytes each, and the worker, inside the Hypha server, has to
receive, authenticate and parse each one in a single step: measured, 2 messages of
100 MB and a 0.8 s stall of the server's event loop, whatever cap it applies afterwards.

So the kernel runs a few lines before ipykernel starts (``python -c BOOTSTRAP``, the
same as ``-m ipykernel_launcher`` otherwise) that patch its output stream:

- a write is sent in pieces of at most ``chunk`` characters, and the stream is flushed
  whenever that much is pending, so no stream message is larger than about ``chunk``;
- per cell, printed text past ``max_output`` characters is dropped in the kernel (the
  worker would drop it anyway: see :mod:`hypha_conda_plugin.outputs`), and when the
  cell ends the kernel sends one ``hypha_conda_output_dropped`` message with how much,
  so the worker can say so.

An exception's message and traceback are clipped the same way (they go out whole in
two messages, ``error`` and ``execute_reply``, so a huge one would otherwise meet the
worker's message size limit and lose the cell's reply).

With ``niceness``, the kernel lowers its own CPU priority first: on a shared machine
ten busy cells (or ten kernels starting) would otherwise take the CPU from the Hypha
server itself, which then answers every user late. A kernel without the capability to
raise it again (the sandbox has none) keeps it, and so does everything it starts.

Nothing is added to the user's namespace, and it survives kernel restarts (same
command line). It is an optimization, not the protection: user code can undo it, and
the worker's own cap (``CellOutputs``) does not trust it.
"""

from __future__ import annotations

from pathlib import Path

from hypha_conda_plugin.outputs import DROPPED_AT_SOURCE, MAX_EVALUE_BYTES, MAX_TRACEBACK_BYTES

#: Largest piece of printed text the kernel sends in one message.
STREAM_CHUNK = 256 * 1024

_BOOTSTRAP = """\
import os
import sys
if %(niceness)d:
    os.nice(%(niceness)d)  # below the server's priority, before the imports of start-up
del os
if sys.path and sys.path[0] == "":
    del sys.path[0]  # as ipykernel_launcher does: no imports from the working folder


def _hypha_conda_limit_output(max_output, chunk, report_type):
    import collections
    import threading

    from ipykernel import iostream
    from ipykernel.ipkernel import IPythonKernel

    write = iostream.OutStream.write
    lock = threading.Lock()
    cells = collections.OrderedDict()  # request msg_id -> [kept, dropped]

    def counter(msg_id):
        with lock:
            counts = cells.get(msg_id)
            if counts is None:
                counts = cells[msg_id] = [0, 0]
                while len(cells) > 64:
                    cells.popitem(last=False)
            return counts

    def limited_write(self, string):
        if not isinstance(string, str) or self.pub_thread is None:
            return write(self, string)  # its own errors
        counts = counter((self.parent_header or {}).get("msg_id"))
        size = len(string)
        room = max_output - counts[0]
        if size > room:
            counts[1] += size - max(room, 0)
            string = string[: max(room, 0)]
        counts[0] += len(string)
        for start in range(0, len(string), chunk):
            piece = string[start : start + chunk]
            write(self, piece)
            pending = getattr(self, "_hypha_conda_pending", 0) + len(piece)
            if pending >= chunk:
                self.flush()
                pending = 0
            self._hypha_conda_pending = pending
        return size

    do_execute = IPythonKernel.do_execute

    async def reporting_do_execute(self, *args, **kwargs):
        try:
            return await do_execute(self, *args, **kwargs)
        finally:
            parent = self.get_parent("shell") or {}
            msg_id = (parent.get("header") or {}).get("msg_id")
            with lock:
                counts = cells.pop(msg_id, None)
            if counts is not None and counts[1]:
                sys.stdout.flush()  # what was kept goes first
                sys.stderr.flush()
                self.session.send(
                    self.iopub_socket,
                    report_type,
                    {"bytes": counts[1]},
                    parent=parent,
                    ident=self._topic(report_type),
                )

    iostream.OutStream.write = limited_write
    IPythonKernel.do_execute = reporting_do_execute


def _hypha_conda_clip_errors(max_evalue, max_traceback):
    # An exception can carry any amount of text (a huge repr in its message): it goes
    # out twice, in IOPub's error and the shell's execute_reply, each a single message
    # the worker's size limit would drop, taking the cell's reply with it.
    from jupyter_client.session import Session

    send = Session.send

    def clip(text, limit):
        text = str(text)
        if len(text) <= limit:
            return text
        return text[:limit] + " ... [" + str(len(text) - limit) + " characters not sent]"

    def clipped(content):
        if not isinstance(content, dict) or "evalue" not in content:
            return content
        content = dict(content)
        content["evalue"] = clip(content.get("evalue", ""), max_evalue)
        lines, budget = [], max_traceback
        for line in content.get("traceback") or []:
            line = clip(line, max_evalue)
            if len(line) > budget:
                lines.append("... [traceback shortened]")
                break
            lines.append(line)
            budget -= len(line)
        content["traceback"] = lines
        return content

    def clipped_send(self, stream, msg_or_type, content=None, *args, **kwargs):
        if msg_or_type in ("error", "execute_reply"):
            content = clipped(content)
        return send(self, stream, msg_or_type, content, *args, **kwargs)

    Session.send = clipped_send


try:
    _hypha_conda_limit_output(%(max_output)d, %(chunk)d, %(report_type)r)
    _hypha_conda_clip_errors(%(max_evalue)d, %(max_traceback)d)
except Exception as error:  # an ipykernel we do not know: run it unpatched
    print("hypha-conda: output limits not installed:", error, file=sys.stderr)
del _hypha_conda_limit_output, _hypha_conda_clip_errors

from ipykernel import kernelapp

kernelapp.launch_new_instance()
"""


def bootstrap_code(max_output: int, chunk: int = STREAM_CHUNK, niceness: int = 0) -> str:
    """The ``python -c`` program that starts ipykernel with the output limits."""
    return _BOOTSTRAP % {
        "niceness": niceness,
        "max_output": max_output,
        "chunk": chunk,
        "report_type": DROPPED_AT_SOURCE,
        # Under the worker's own limits, so the note of what was cut survives them.
        "max_evalue": MAX_EVALUE_BYTES // 2,
        "max_traceback": MAX_TRACEBACK_BYTES // 2,
    }


def kernel_argv(python: Path, *, max_output: int, niceness: int = 0) -> list[str]:
    """The kernelspec ``argv`` of a kernel in the environment of ``python``."""
    code = bootstrap_code(max_output, niceness=niceness)
    return [str(python), "-c", code, "-f", "{connection_file}"]
