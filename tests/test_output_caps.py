"""The output cap: what a cell prints can never fill the server's memory or stall it.

Three layers, each tested where it lives: ``CellOutputs`` with hand-made Jupyter
messages (every ordering, cheaply), a real kernel with a small cap (the kernel bootstrap
and the worker's own cap, including a kernel that bypasses the bootstrap), and the whole
thing through a real Hypha server, whose process memory and responsiveness are measured
while a cell prints 200 MB.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from hypha_conda_plugin.kernel import Kernel
from hypha_conda_plugin.outputs import (
    DROPPED_AT_SOURCE,
    ITEM_OVERHEAD,
    CellOutputs,
    clip_text,
    json_size,
    text_size,
)
from hypha_conda_plugin.sessions import MAX_LOG_ENTRY_BYTES, SessionLog
from tests.conftest import WALKTHROUGH_DEPENDENCIES
from tests.test_outputs import display, feed, msg, ok_reply, stream

# ------------------------------------------------------------ sizes as text


def test_text_size_is_utf8_and_clip_never_splits_a_character() -> None:
    assert text_size("abc") == 3
    assert text_size("é") == 2 and text_size("😀") == 4
    assert clip_text("abcdef", 4) == "abcd"
    assert clip_text("éééé", 5) == "éé"  # 4 bytes; a third é would need 6
    assert clip_text("anything", 0) == ""
    assert text_size(clip_text("😀" * 100, 101)) <= 101


def test_json_size_counts_nested_values_without_recursion() -> None:
    assert json_size({"text/plain": "x" * 1000}) >= 1000
    deep: Any = "leaf"
    for _ in range(100_000):  # far deeper than Python's recursion limit
        deep = [deep]
    assert json_size(deep) > 100_000


# ---------------------------------------------------------- CellOutputs' cap


async def test_output_under_the_cap_is_untouched() -> None:
    cell = await feed(CellOutputs(max_bytes=1000), stream("stdout", "a" * 500))
    result = cell.from_reply(ok_reply(1))
    assert result["outputs_truncated"] is False
    assert result["outputs"] == [{"type": "stream", "name": "stdout", "text": "a" * 500}]


async def test_stream_past_the_cap_keeps_what_fits_and_says_how_much_was_dropped() -> None:
    seen: list[dict[str, Any]] = []
    cap = 10_000
    cell = await feed(
        CellOutputs(seen.append, max_bytes=cap),
        *(stream("stdout", "x" * 1000 + "\n") for _ in range(100)),
    )
    result = cell.from_reply(ok_reply(1))

    assert result["status"] == "ok"
    assert result["outputs_truncated"] is True
    kept, notice = result["outputs"]
    assert kept["name"] == "stdout"
    assert len(kept["text"]) == cap - ITEM_OVERHEAD  # filled up to the cap exactly
    assert notice["name"] == "stderr"
    dropped = 100 * 1001 - len(kept["text"])
    assert "Output truncated" in notice["text"] and "CONDA_MAX_OUTPUT_BYTES" in notice["text"]
    assert f"{dropped / 1024:.1f} KiB more were dropped" in notice["text"]
    # The streaming client got exactly what the result kept, then the same notice.
    assert "".join(i["text"] for i in seen[:-1]) == kept["text"]
    assert seen[-1] == {"type": "stream", "name": "stderr", "text": notice["text"]}


async def test_rich_outputs_count_against_the_same_cap_and_are_dropped_whole() -> None:
    cell = await feed(
        CellOutputs(max_bytes=4000),  # each display is about 1.7 kB (data and metadata)
        display("display_data", "a" * 800),
        display("display_data", "b" * 800),
        display("display_data", "c" * 800),  # would pass the cap: dropped, not cut
        stream("stdout", "after"),  # nothing after the cap is kept, not even small output
    )
    result = cell.from_reply(ok_reply(1))
    assert [o["data"]["text/plain"][0] for o in result["outputs"][:-1]] == ["a", "b"]
    assert result["outputs"][-1]["name"] == "stderr"
    assert result["outputs_truncated"] is True
    assert cell.dropped_messages == 2


async def test_display_updates_count_against_the_cap() -> None:
    seen: list[dict[str, Any]] = []
    cell = CellOutputs(seen.append, max_bytes=5000)
    await cell.handle(display("display_data", "0", "bar"))
    for i in range(1, 100):
        await cell.handle(display("update_display_data", str(i) * 100, "bar"))
    result = cell.from_reply(ok_reply(1))
    assert result["outputs_truncated"] is True
    # The display shows the last update that fitted; later ones reached no one.
    shown = result["outputs"][0]["data"]["text/plain"]
    updates = [i for i in seen if i["type"] == "update_display_data"]
    assert updates[-1]["data"]["text/plain"] == shown
    assert len(updates) < 99


async def test_the_kernel_reports_what_it_dropped_at_the_source() -> None:
    cell = await feed(
        CellOutputs(max_bytes=10_000),
        stream("stdout", "y" * 5000),
        msg(DROPPED_AT_SOURCE, bytes=3 * 1024 * 1024),
    )
    result = cell.from_reply(ok_reply(1))
    assert result["outputs_truncated"] is True
    assert result["outputs"][0]["text"] == "y" * 5000
    assert "3.0 MiB more were dropped" in result["outputs"][-1]["text"]


@pytest.mark.parametrize("bogus", [-5, "lots", None, True, 1.5])
async def test_a_nonsense_drop_report_is_ignored(bogus: object) -> None:
    cell = await feed(CellOutputs(max_bytes=1000), msg(DROPPED_AT_SOURCE, bytes=bogus))
    assert cell.from_reply(ok_reply(1))["outputs_truncated"] is False


async def test_the_notice_is_added_once_even_when_the_result_is_built_twice() -> None:
    cell = await feed(CellOutputs(max_bytes=1000), stream("stderr", "z" * 5000))
    cell.from_reply({"status": "error", "ename": "E", "evalue": "", "traceback": []})
    result = cell.failure("TimeoutError", "too slow")
    assert len(result["outputs"]) == 1  # the notice joined the stderr item it followed
    assert result["outputs"][0]["text"].count("Output truncated") == 1


async def test_clear_output_cannot_reset_the_cap() -> None:
    """Counting everything a cell sent (not what is left) is what bounds the work."""
    messages = []
    for _ in range(20):
        messages += [stream("stdout", "w" * 900), msg("clear_output", wait=False)]
    cell = await feed(CellOutputs(max_bytes=5000), *messages)
    assert cell.from_reply(ok_reply(1))["outputs_truncated"] is True


async def test_many_small_chunks_are_joined_once() -> None:
    chunks = [stream("stdout", f"{i}\n") for i in range(50_000)]
    cell = await feed(CellOutputs(), *chunks)
    result = cell.from_reply(ok_reply(1))
    assert result["outputs"][0]["text"] == "".join(f"{i}\n" for i in range(50_000))


async def test_an_enormous_traceback_is_shortened_in_the_middle() -> None:
    frames = [f"frame {i}: " + "." * 200 for i in range(10_000)]
    cell = await feed(
        CellOutputs(),
        msg("error", ename="RecursionError", evalue="v" * 10**6, traceback=frames),
    )
    error = cell.from_reply({"status": "error"})["error"]
    assert len("\n".join(error["traceback"])) <= 300 * 1024
    assert error["traceback"][0].startswith("frame 0:")
    assert error["traceback"][-1].startswith("frame 9999:")
    assert any("lines omitted" in line for line in error["traceback"])
    assert len(error["evalue"]) <= 64 * 1024


# ------------------------------------------------------------ session log


def test_log_entries_are_clipped_and_the_log_is_bounded_in_bytes() -> None:
    log = SessionLog(limit=10_000, max_bytes=256 * 1024)
    log.add("stdout", "a" * 10**6)
    entry = log.query()["items"][0]["content"]
    assert len(entry) < MAX_LOG_ENTRY_BYTES + 200
    assert "more bytes not kept in the log" in entry

    for i in range(1000):
        log.add("stdout", f"{i}:" + "b" * 10_000)
    assert log.bytes <= 256 * 1024
    items = log.query()["items"]
    assert items[-1]["content"].startswith("999:")  # the newest are kept
    assert sum(len(item["content"]) for item in items) <= 256 * 1024
    assert log.dropped > 900


# ------------------------------------------------------- a real kernel, small cap

SMALL_CAP = 64 * 1024


@pytest.fixture(scope="module")
async def capped_kernel(kernel_python: Path, tmp_path_factory: pytest.TempPathFactory):
    kernel = Kernel(
        kernel_python,
        cwd=tmp_path_factory.mktemp("capped"),
        env={"PATH": "/usr/bin:/bin"},
        max_output_bytes=SMALL_CAP,
    )
    await kernel.start()
    yield kernel
    await kernel.shutdown()


def _stdout(result: dict[str, Any]) -> str:
    return "".join(o["text"] for o in result["outputs"] if o.get("name") == "stdout")


async def test_a_real_kernel_is_truncated_and_reports_the_total_dropped(capped_kernel) -> None:
    result = await capped_kernel.execute(
        "for i in range(100): print(str(i % 10) * 99_999)\nprint('done')"
    )
    assert result["status"] == "ok"
    assert result["outputs_truncated"] is True
    kept = len(_stdout(result))
    assert SMALL_CAP - 1024 < kept <= SMALL_CAP
    # Everything printed but not kept, whether the kernel dropped it (most) or the
    # worker (the few bytes past its cap, which also counts each item's overhead).
    dropped = 100 * 100_000 + len("done\n") - kept
    assert f"{dropped / 2**20:.1f} MiB more were dropped" in result["outputs"][-1]["text"]

    after = await capped_kernel.execute("print('fresh cell')")
    assert after["outputs_truncated"] is False
    assert _stdout(after) == "fresh cell\n"


async def test_the_kernel_keeps_running_the_cell_past_the_cap(capped_kernel) -> None:
    result = await capped_kernel.execute(
        "for i in range(10**4): print('.' * 100)\nfinished = True\n'the end'"
    )
    assert result["outputs_truncated"] is True
    assert result["outputs"][0]["text"].startswith("." * 100)
    # Everything past the cap is dropped, the cell's value too; the notice is last.
    assert [o["type"] for o in result["outputs"]] == ["stream", "stream"]
    check = await capped_kernel.execute("finished")
    assert check["outputs"][0]["data"]["text/plain"] == "True"


async def test_an_error_after_the_cap_is_still_reported(capped_kernel) -> None:
    result = await capped_kernel.execute("print('e' * 10**6)\n1 / 0")
    assert result["status"] == "error"
    assert result["error"]["ename"] == "ZeroDivisionError"
    assert result["outputs_truncated"] is True


async def test_a_kernel_that_bypasses_the_bootstrap_is_still_capped(capped_kernel) -> None:
    """User code owns its kernel: it can publish stream messages directly. The worker's
    own cap does not rely on the kernel's cooperation."""
    code = (
        "k = get_ipython().kernel\n"
        "parent = k.get_parent('shell')\n"
        "for _ in range(20):\n"
        "    k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'r' * 100_000},"
        " parent=parent, ident=k._topic('stream'))\n"
    )
    result = await capped_kernel.execute(code)
    assert result["status"] == "ok"
    assert result["outputs_truncated"] is True
    kept = len(_stdout(result))
    assert kept <= SMALL_CAP
    dropped = 20 * 100_000 - kept
    assert f"{dropped / 2**20:.1f} MiB more were dropped" in result["outputs"][-1]["text"]


async def test_one_huge_message_is_refused_before_it_reaches_the_server(capped_kernel) -> None:
    """A single message far past the cap (the bootstrap would have split it; user code
    went around it) is never received whole: ZeroMQ drops it at the socket (its size
    limit is the cap plus room for headers), the cell still ends, says output was lost,
    and the kernel goes on working."""
    code = (
        "k = get_ipython().kernel\n"
        "k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'h' * 50_000_000},"
        " parent=k.get_parent('shell'), ident=k._topic('stream'))\n"
    )
    started = time.perf_counter()
    result = await capped_kernel.execute(code, timeout=120)
    assert time.perf_counter() - started < 30
    assert result["status"] == "ok"
    assert result["outputs_truncated"] is True
    assert "h" * 1000 not in _stdout(result)
    after = await capped_kernel.execute("print('next')")
    assert _stdout(after) == "next\n"


async def test_an_exception_with_a_huge_message_is_reported_clipped(capped_kernel) -> None:
    """A careless cell: an error whose message is 50 MB (a huge repr). It still comes
    back at once, as the error it is, clipped; and the kernel goes on."""
    started = time.perf_counter()
    result = await capped_kernel.execute("raise ValueError('x' * 50_000_000)", timeout=120)
    assert time.perf_counter() - started < 10
    assert result["status"] == "error"
    assert result["error"]["ename"] == "ValueError"
    assert "characters not sent" in result["error"]["evalue"]
    assert len(result["error"]["evalue"]) < 100_000
    after = await capped_kernel.execute("print('next')")
    assert _stdout(after) == "next\n"


# ----------------------------------------------------- through a real Hypha server

FLOOD = "for i in range(200):\n    print('x' * 10**6)"  # 200 MB in 1 MB lines


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def _flood_while_watching(worker, session_id: str, other_client, pid: int):
    """Run FLOOD; meanwhile another client's echo round trips and the server's RSS."""
    await other_client.echo("warm-up")
    baseline = peak = _rss_mb(pid)
    round_trips: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            started = time.perf_counter()
            assert await other_client.echo("ping") == "ping"
            round_trips.append(time.perf_counter() - started)
            peak = max(peak, _rss_mb(pid))
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        result = await worker.execute(session_id, FLOOD, config={"timeout": 120})
    finally:
        done.set()
        await watcher
    return result, max(peak, _rss_mb(pid)) - baseline, round_trips


async def test_a_flood_is_truncated_at_the_default_cap_and_server_memory_stays_flat(
    conda_worker, ready_session, other_client, hypha_server
):
    """The shared server runs the default settings: 16 MiB of the 200 MB are kept, and
    the Hypha server (the worker runs inside it) grows by less than 100 MB."""
    pid = hypha_server.server_pid
    assert pid is not None
    result, growth, _ = await _flood_while_watching(conda_worker, ready_session, other_client, pid)

    assert result["status"] == "ok"
    assert result["outputs_truncated"] is True
    kept = sum(len(o["text"]) for o in result["outputs"] if o["name"] == "stdout")
    assert 16 * 2**20 - 1024 < kept <= 16 * 2**20
    assert "more were dropped" in result["outputs"][-1]["text"]
    assert growth < 100, f"server RSS grew {growth:.0f} MB"

    # The session is usable, and its log stayed within its byte budget.
    after = await conda_worker.execute(ready_session, "print('still usable')")
    assert after["outputs"] == [{"type": "stream", "name": "stdout", "text": "still usable\n"}]
    assert after["outputs_truncated"] is False
    logs = await conda_worker.get_logs(ready_session)
    assert sum(len(item["content"]) for item in logs["items"]) <= 1024 * 1024


@pytest.fixture(scope="module")
async def small_cap_server(offline_channel, tmp_path_factory, worker_dirs):
    """A server of its own with a 1 MiB cap (environments shared with the main one).

    Returning a 16 MiB result through Hypha (chunked messages, websocket compression)
    holds the server's event loop for 150-300 ms on this shared machine whatever the
    worker does: benchmarks/bench_outputs.py shows the same for a cell that legitimately
    prints 15 MiB. This server keeps results small so the test measures the flood.
    """
    from hypha_conda_plugin.local_server import LocalServer

    server = LocalServer(
        tmp_path_factory.mktemp("small-cap-server"),
        s3=False,
        server_apps=False,
        plugin_env={
            "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
            "CONDA_WORKING_DIR": str(tmp_path_factory.mktemp("small-cap-sessions")),
            "CONDA_CACHE_DIR": str(worker_dirs["cache"]),
            "CONDA_MAX_OUTPUT_BYTES": str(2**20),
        },
    )
    async with server:
        yield server


async def test_a_flood_leaves_the_server_responsive_to_other_clients(small_cap_server):
    from hypha_rpc import connect_to_server

    clients = []
    for workspace in ("flood-ws", "bystander-ws"):
        token = await small_cap_server.user_token(workspace)
        clients.append(
            await connect_to_server(
                {"server_url": small_cap_server.url, "workspace": workspace, "token": token}
            )
        )
    flooder, bystander = clients
    try:
        worker = await flooder.get_service("public/conda-worker")
        # The environment the main server's shared session built: no build here.
        manifest = {"dependencies": WALKTHROUGH_DEPENDENCIES}
        session_id = await worker.start({"manifest": manifest})
        pid = small_cap_server.server_pid
        assert pid is not None
        result, growth, round_trips = await _flood_while_watching(
            worker, session_id, bystander, pid
        )

        assert result["outputs_truncated"] is True
        kept = sum(len(o["text"]) for o in result["outputs"] if o["name"] == "stdout")
        dropped = 200 * (10**6 + 1) - kept
        assert f"{dropped / 2**20:.1f} MiB more were dropped" in result["outputs"][-1]["text"]
        assert growth < 100, f"server RSS grew {growth:.0f} MB"
        assert len(round_trips) >= 5
        assert max(round_trips) < 0.25, f"slowest echo {max(round_trips) * 1000:.0f} ms"
        after = await worker.execute(session_id, "print('next cell')")
        assert after["outputs"][0]["text"] == "next cell\n"
        await worker.stop(session_id)
    finally:
        for client in clients:
            await client.disconnect()
