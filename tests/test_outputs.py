"""The output contract, fed hand-made Jupyter messages: no kernel, so every case is cheap.

The messages are plain dicts in the Jupyter messaging format, shaped as jupyter_client
delivers them. tests/test_kernel.py checks the same contract end to end with a real
kernel; these cover the orderings and corner cases a real kernel is hard to provoke
into (interleaved streams, deferred clears, updates of several displays, replies
without an IOPub error...).
"""

from __future__ import annotations

import itertools
from typing import Any

from hypha_conda_plugin.outputs import CellOutputs, plain_traceback

_ids = itertools.count()

RED = "\x1b[0;31m"
RESET = "\x1b[0m"


def msg(msg_type: str, **content: Any) -> dict[str, Any]:
    """An IOPub message as jupyter_client's ``get_iopub_msg`` returns it."""
    return {
        "header": {"msg_id": f"m{next(_ids)}", "msg_type": msg_type, "version": "5.3"},
        "parent_header": {"msg_id": "cell", "msg_type": "execute_request"},
        "metadata": {},
        "msg_type": msg_type,
        "content": content,
        "buffers": [],
    }


def stream(name: str, text: str) -> dict[str, Any]:
    return msg("stream", name=name, text=text)


def display(kind: str, text: str, display_id: str | None = None, **extra: Any) -> dict[str, Any]:
    transient = {"display_id": display_id} if display_id is not None else {}
    return msg(
        kind,
        data={"text/plain": text},
        metadata={"note": text},
        transient=transient,
        **extra,
    )


def ok_reply(execution_count: int) -> dict[str, Any]:
    """The content of an ``execute_reply`` (what ``from_reply`` is given)."""
    return {"status": "ok", "execution_count": execution_count, "user_expressions": {}}


async def feed(cell: CellOutputs, *messages: dict[str, Any]) -> CellOutputs:
    for message in messages:
        await cell.handle(message)
    return cell


# ------------------------------------------------------------------------ streams


async def test_consecutive_chunks_of_a_stream_merge() -> None:
    cell = await feed(CellOutputs(), stream("stdout", "a"), stream("stdout", "b\n"))
    assert cell.from_reply(ok_reply(1))["outputs"] == [
        {"type": "stream", "name": "stdout", "text": "ab\n"}
    ]


async def test_interleaved_streams_stay_separate_items_in_order() -> None:
    cell = await feed(
        CellOutputs(),
        stream("stdout", "1"),
        stream("stderr", "2"),
        stream("stderr", "3"),
        stream("stdout", "4"),
    )
    assert [(o["name"], o["text"]) for o in cell.outputs] == [
        ("stdout", "1"),
        ("stderr", "23"),
        ("stdout", "4"),
    ]


async def test_stream_does_not_merge_across_a_display() -> None:
    cell = await feed(
        CellOutputs(),
        stream("stdout", "before"),
        display("display_data", "x"),
        stream("stdout", "after"),
    )
    assert [o["type"] for o in cell.outputs] == ["stream", "display_data", "stream"]
    assert cell.outputs[2]["text"] == "after"


# ------------------------------------------------------------------- rich output


async def test_execute_result_carries_execution_count() -> None:
    cell = await feed(
        CellOutputs(),
        msg("execute_input", code="6 * 7", execution_count=5),
        display("execute_result", "42", execution_count=5),
    )
    result = cell.from_reply(ok_reply(5))
    assert result == {
        "status": "ok",
        "outputs": [
            {
                "type": "execute_result",
                "data": {"text/plain": "42"},
                "metadata": {"note": "42"},
                "execution_count": 5,
            }
        ],
        "error": None,
        "execution_count": 5,
        "outputs_truncated": False,
    }


async def test_execution_count_comes_from_execute_input_without_a_reply_count() -> None:
    cell = await feed(CellOutputs(), msg("execute_input", code="x", execution_count=3))
    assert cell.from_reply({"status": "ok"})["execution_count"] == 3
    assert cell.failure("TimeoutError", "too slow")["execution_count"] == 3


async def test_display_id_is_kept_only_when_the_kernel_sent_one() -> None:
    cell = await feed(
        CellOutputs(), display("display_data", "plain"), display("display_data", "h", "d1")
    )
    assert "display_id" not in cell.outputs[0]
    assert cell.outputs[1]["display_id"] == "d1"


async def test_update_display_data_updates_the_matching_item_in_place() -> None:
    cell = await feed(
        CellOutputs(),
        display("display_data", "first", "d1"),
        display("display_data", "other", "d2"),
        stream("stdout", "between"),
        display("update_display_data", "second", "d1"),
    )
    assert [(o["type"], o.get("display_id")) for o in cell.outputs] == [
        ("display_data", "d1"),
        ("display_data", "d2"),
        ("stream", None),
    ]
    assert cell.outputs[0]["data"] == {"text/plain": "second"}
    assert cell.outputs[0]["metadata"] == {"note": "second"}
    assert cell.outputs[1]["data"] == {"text/plain": "other"}


async def test_update_of_a_display_from_an_earlier_cell_becomes_a_new_display() -> None:
    cell = await feed(CellOutputs(), display("update_display_data", "new", "elsewhere"))
    assert cell.outputs == [
        {
            "type": "display_data",
            "data": {"text/plain": "new"},
            "metadata": {"note": "new"},
            "display_id": "elsewhere",
        }
    ]


# ------------------------------------------------------------------- clear_output


async def test_clear_output_wait_clears_only_when_the_next_output_arrives() -> None:
    cell = await feed(
        CellOutputs(),
        stream("stdout", "old"),
        msg("clear_output", wait=True),
    )
    assert cell.outputs == [{"type": "stream", "name": "stdout", "text": "old"}]
    await cell.handle(stream("stdout", "new"))
    assert cell.outputs == [{"type": "stream", "name": "stdout", "text": "new"}]


async def test_clear_output_wait_with_nothing_after_keeps_the_output() -> None:
    cell = await feed(CellOutputs(), stream("stdout", "last"), msg("clear_output", wait=True))
    assert cell.from_reply(ok_reply(1))["outputs"] == [
        {"type": "stream", "name": "stdout", "text": "last"}
    ]


async def test_clear_output_without_wait_clears_at_once() -> None:
    cell = await feed(CellOutputs(), stream("stdout", "gone"), msg("clear_output", wait=False))
    assert cell.outputs == []


# ------------------------------------------------------------------------- errors


async def test_error_goes_to_error_with_plain_lines_not_to_outputs() -> None:
    traceback = [
        f"{RED}---------------------------------------------------------------------------{RESET}",
        f"{RED}NameError{RESET}                                 Traceback\n"
        f"Cell {RED}In[1], line 1{RESET}\n----> 1 undefined_name",
        f"{RED}NameError{RESET}: name 'undefined_name' is not defined",
    ]
    cell = await feed(
        CellOutputs(),
        stream("stdout", "before\n"),
        msg("error", ename="NameError", evalue="name 'undefined_name'", traceback=traceback),
    )
    result = cell.from_reply(
        {"status": "error", "execution_count": 1, "ename": "NameError", "evalue": "?"}
    )
    assert result["status"] == "error"
    assert result["outputs"] == [{"type": "stream", "name": "stdout", "text": "before\n"}]
    error = result["error"]
    assert error["ename"] == "NameError"
    assert error["evalue"] == "name 'undefined_name'"  # the IOPub error wins over the reply
    assert error["traceback"] == [
        "---------------------------------------------------------------------------",
        "NameError                                 Traceback",
        "Cell In[1], line 1",
        "----> 1 undefined_name",
        "NameError: name 'undefined_name' is not defined",
    ]


async def test_error_from_the_reply_when_iopub_sent_none() -> None:
    reply = {
        "status": "error",
        "execution_count": 2,
        "ename": "ValueError",
        "evalue": "bad",
        "traceback": [f"{RED}ValueError{RESET}: bad"],
    }
    result = CellOutputs().from_reply(reply)
    assert result["error"] == {
        "ename": "ValueError",
        "evalue": "bad",
        "traceback": ["ValueError: bad"],
    }
    assert result["execution_count"] == 2


async def test_aborted_reply_is_an_error() -> None:
    result = CellOutputs().from_reply({"status": "aborted"})
    assert result["status"] == "error"
    assert result["error"]["ename"] == "ExecutionAborted"
    assert result["error"]["traceback"] == []


async def test_failure_keeps_outputs_and_the_kernel_traceback() -> None:
    cell = await feed(
        CellOutputs(),
        stream("stdout", "partial"),
        msg("error", ename="KeyboardInterrupt", evalue="", traceback=[f"{RED}KI{RESET}"]),
    )
    result = cell.failure("TimeoutError", "The cell ran too long.")
    assert result["outputs"] == [{"type": "stream", "name": "stdout", "text": "partial"}]
    assert result["error"] == {
        "ename": "TimeoutError",
        "evalue": "The cell ran too long.",
        "traceback": ["KI"],
    }
    assert CellOutputs().failure("KernelDied", "gone")["error"]["traceback"] == []


def test_plain_traceback_splits_frames_into_lines() -> None:
    assert plain_traceback([f"{RED}a{RESET}\nb", "c"]) == ["a", "b", "c"]
    assert plain_traceback([]) == []


# --------------------------------------------------------------- other messages


async def test_status_and_comm_messages_are_counted_but_ignored() -> None:
    cell = await feed(
        CellOutputs(),
        msg("status", execution_state="busy"),
        msg("comm_open", comm_id="c", target_name="t", data={}),
    )
    assert cell.messages_seen == 2
    assert cell.from_reply(ok_reply(1))["outputs"] == []


# ---------------------------------------------------------------------- callback


async def test_callback_receives_items_and_events_in_order() -> None:
    seen: list[dict[str, Any]] = []
    await feed(
        CellOutputs(seen.append),
        stream("stdout", "a"),
        stream("stdout", "b"),
        display("display_data", "v1", "d"),
        display("update_display_data", "v2", "d"),
        msg("clear_output", wait=True),
        stream("stderr", "c"),
        msg("error", ename="E", evalue="", traceback=[]),
        display("execute_result", "r", execution_count=1),
    )
    assert [(i["type"], i.get("text") or i.get("data")) for i in seen] == [
        ("stream", "a"),
        ("stream", "b"),  # chunks, not the merged text: a streaming client appends them
        ("display_data", {"text/plain": "v1"}),
        ("update_display_data", {"text/plain": "v2"}),
        ("clear_output", None),
        ("stream", "c"),
        ("execute_result", {"text/plain": "r"}),
    ]
    assert seen[3]["display_id"] == "d"


async def test_sync_callback_and_no_callback_both_work() -> None:
    seen: list[str] = []
    await feed(CellOutputs(lambda item: seen.append(item["type"])), stream("stdout", "x"))
    assert seen == ["stream"]
    assert (await feed(CellOutputs(None), stream("stdout", "x"))).outputs[0]["text"] == "x"


async def test_merging_does_not_change_chunks_the_callback_already_got() -> None:
    """The stored item is a copy: appending to it must not rewrite what a client holds."""
    seen: list[dict[str, Any]] = []
    cell = await feed(CellOutputs(seen.append), stream("stdout", "a"), stream("stdout", "b"))
    assert [item["text"] for item in seen] == ["a", "b"]
    assert cell.outputs == [{"type": "stream", "name": "stdout", "text": "ab"}]
