"""Client callbacks never hold anything: not a lock, not a cell's time, not a session.

``CallbackQueue`` is tested on its own with local callbacks (order, drops, failures,
bounded waits); then through a real Hypha server with remote callbacks that sleep: 20
slow starts must not delay another workspace's start of the same environment, and a
slow output callback must not count against the cell's time limit.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from hypha_conda_plugin.callbacks import CallbackQueue
from hypha_conda_plugin.sessions import SessionManager

# ------------------------------------------------------------ the queue itself


async def test_messages_arrive_in_order_whatever_each_delivery_takes() -> None:
    seen: list[int] = []

    async def jittery(message: dict[str, Any]) -> None:
        await asyncio.sleep(random.random() / 500)
        seen.append(message["n"])

    queue = CallbackQueue(jittery, what="test callback")
    for n in range(200):
        queue.put({"n": n})
    report = await queue.aclose(grace=10)
    assert seen == list(range(200))
    assert (report.delivered, report.lost) == (200, 0)


async def test_put_never_waits_and_a_full_queue_drops_and_counts() -> None:
    release = asyncio.Event()

    async def stuck(message: dict[str, Any]) -> None:
        await release.wait()

    queue = CallbackQueue(stuck, what="stuck callback", maxsize=5, timeout=60)
    started = time.perf_counter()
    for n in range(100):
        queue.put({"n": n})
    assert time.perf_counter() - started < 0.05
    assert queue.dropped == 95  # five fit; the delivery task has not even run yet
    await asyncio.sleep(0)  # now it has taken the first one and is stuck in it

    started = time.perf_counter()
    report = await queue.aclose(grace=0.2)
    assert time.perf_counter() - started < 1
    # One was being delivered, four waited: all given up on, none delivered.
    assert (report.delivered, report.dropped, report.failed) == (0, 100, 0)


async def test_failing_and_timed_out_deliveries_are_counted_and_the_rest_go_on() -> None:
    seen: list[int] = []

    async def flaky(message: dict[str, Any]) -> None:
        if message["n"] == 1:
            raise ConnectionError("client went away")
        if message["n"] == 2:
            await asyncio.sleep(10)
        seen.append(message["n"])

    queue = CallbackQueue(flaky, what="flaky callback", timeout=0.1)
    for n in range(5):
        queue.put({"n": n})
    report = await queue.aclose(grace=5)
    assert seen == [0, 3, 4]
    assert (report.delivered, report.failed, report.dropped) == (3, 2, 0)


async def test_sync_callbacks_and_no_callback() -> None:
    seen: list[dict[str, Any]] = []
    queue = CallbackQueue(seen.append, what="sync callback")
    queue.put({"a": 1})
    assert (await queue.aclose()).delivered == 1 and seen == [{"a": 1}]

    nobody = CallbackQueue(None, what="absent callback")
    nobody.put({"a": 1})
    assert not nobody.active and (await nobody.aclose(grace=0)).lost == 0


async def test_a_session_cancels_its_deliveries_and_logs_what_was_lost(tmp_path: Path) -> None:
    sessions = SessionManager(max_log_entries=1000)
    session = sessions.create("ws", "s", None)

    async def forever(message: dict[str, Any]) -> None:
        await asyncio.sleep(3600)

    kept = session.deliver_to(forever, "output_callback of execute")
    ended = session.deliver_to(forever, "progress_callback of execute")
    for n in range(3):
        kept.put({"n": n})
        ended.put({"n": n})
    await asyncio.sleep(0)
    await session.finish_delivery(kept, grace=0.1)
    assert session.deliveries == {ended}
    logged = [i["content"] for i in session.log.query("info")["items"]]
    assert any(
        "output_callback of execute was too slow" in line and "3 of 3" in line for line in logged
    )

    task = ended._task
    session.cancel_deliveries()
    assert session.deliveries == set()
    assert task is not None
    await asyncio.wait({task}, timeout=1)
    assert task.cancelled()


# ----------------------------------------------------- through a real Hypha server


def _slow_callback(arrived: list[str], seconds: float, running: set[asyncio.Task]):
    async def callback(message: dict[str, Any]) -> None:
        arrived.append(message.get("message", ""))
        task = asyncio.current_task()
        assert task is not None
        running.add(task)
        try:
            await asyncio.sleep(seconds)
        finally:
            running.discard(task)

    return callback


async def test_slow_progress_callbacks_do_not_delay_another_workspaces_start(
    conda_worker, other_client
):
    """20 starts whose progress callback sleeps, then a start in another workspace.

    The 20 name an app that does not exist, so they fail right after getting the
    environment, when reading its entry point. Before the queues, each held the
    environment's locks for 10 s while its callback was sent "Reusing cached
    environment": the 20th got there after more than 3 minutes, and every other start
    of that environment waited behind them. Now all 20 are through within seconds (their
    calls return once their callbacks had a bounded time to catch up), and the other
    workspace's start takes as long as it does alone.
    """
    dependencies = ["python", "numpy", "hypha-rpc"]  # what an app of this spec gets
    bob_worker = await other_client.get_service("public/conda-worker")

    async def timed_start(session_id: str) -> float:
        started = time.perf_counter()
        await bob_worker.start({"id": session_id, "manifest": {"dependencies": dependencies}})
        elapsed = time.perf_counter() - started
        await bob_worker.stop(session_id)
        return elapsed

    await timed_start("env-warm-up")  # builds the environment if no test did yet
    baseline = await timed_start("alone")

    arrived: list[list[str]] = [[] for _ in range(20)]
    sleeping: set[asyncio.Task] = set()
    launched = time.perf_counter()
    slow_starts = [
        asyncio.ensure_future(
            conda_worker.start(
                {
                    "id": f"slow-{n}",
                    "manifest": {"dependencies": dependencies, "entry_point": "main.py"},
                    "app_id": "no-such-app",
                    "progress_callback": _slow_callback(arrived[n], 30, sleeping),
                }
            )
        )
        for n in range(20)
    ]

    async def states() -> list[str]:
        infos = await conda_worker.list_sessions()
        return [i["status"] for i in infos if i["session_id"].startswith("slow-")]

    while (await states()).count("failed") < 20 and time.perf_counter() - launched < 30:
        await asyncio.sleep(0.1)
    through = time.perf_counter() - launched
    assert through < 15, f"the 20 slow starts needed {through:.1f} s to get their environment"
    assert all(arrived)  # and their callbacks were called meanwhile

    contended = await timed_start("next-to-slow-callbacks")
    assert contended - baseline < 1.0, (
        f"start took {contended:.2f} s next to 20 slow callbacks, {baseline:.2f} s alone"
    )

    outcomes = await asyncio.gather(*slow_starts, return_exceptions=True)
    returned = time.perf_counter() - launched
    assert all("Could not read the app's file" in str(o) for o in outcomes)
    assert returned < 30, f"a start with a stuck callback returned after {returned:.0f} s"
    # Each failed start said in its log that its callback missed messages.
    logs = await conda_worker.get_logs("slow-0", type="info")
    assert any("progress_callback was too slow" in i["content"] for i in logs["items"])
    for task in sleeping:  # the worker gave up on them; end them while still connected
        task.cancel()


async def test_a_slow_output_callback_does_not_count_against_the_cell_time_limit(
    conda_worker, ready_session
):
    seen: list[str] = []

    async def slow(item: dict[str, Any]) -> None:
        await asyncio.sleep(0.5)
        seen.append(item.get("text", ""))

    code = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.1)"
    started = time.perf_counter()
    result = await conda_worker.execute(
        ready_session, code, config={"timeout": 1.5}, output_callback=slow
    )
    elapsed = time.perf_counter() - started

    # The cell itself takes 0.6 s; delivering its 6 items takes 3 s.
    assert result["status"] == "ok", result["error"]
    assert "".join(o["text"] for o in result["outputs"]) == "0\n1\n2\n3\n4\n5\n"
    # execute returned only once the client had every item, in order.
    assert "".join(seen) == "0\n1\n2\n3\n4\n5\n"
    assert elapsed >= 3.0


async def test_stop_ends_deliveries_and_execute_returns(offline_channel, session_tmp, tmp_path):
    """In-process worker (to see its tasks): a callback that never returns holds
    neither the execute (bounded wait) nor anything after the session stops."""
    from hypha_conda_plugin.settings import Settings
    from hypha_conda_plugin.worker import CondaWorker

    worker = CondaWorker(
        Settings(
            cache_dir=session_tmp / "kernel-env-cache",  # the environment kernel tests use
            working_dir=tmp_path / "work",
            channel_alias=offline_channel.alias_url,
        )
    )
    caller = {"ws": "ws-x", "user": {"id": "x"}}
    await worker.start({"id": "s", "manifest": {"dependencies": []}}, context=caller)

    async def never(item: dict[str, Any]) -> None:
        await asyncio.sleep(3600)

    code = "for i in range(5): print(i, flush=True)"
    running = asyncio.create_task(worker.execute("s", code, output_callback=never, context=caller))
    await asyncio.sleep(2)  # the cell is done; execute waits for the stuck callback
    assert not running.done()
    started = time.perf_counter()
    await worker.stop("s", context=caller)
    result = await asyncio.wait_for(running, 5)
    assert time.perf_counter() - started < 5
    assert result["status"] == "ok"
    await asyncio.sleep(0)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("deliver ")]
    await worker.close()


@pytest.mark.parametrize("field", ["progress_callback", "output_callback"])
async def test_a_callback_that_is_not_a_function_is_refused(conda_worker, ready_session, field):
    with pytest.raises(Exception, match=f"{field} must be a function"):
        await conda_worker.execute(ready_session, "1", **{field: "not callable"})
