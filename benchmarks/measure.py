"""Small measuring helpers the benchmark scripts share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil

from hypha_conda_plugin.channel import build_channel
from hypha_conda_plugin.settings import Settings
from hypha_conda_plugin.worker import CondaWorker

REPO = Path(__file__).resolve().parents[1]


def offline_alias() -> str:
    """The offline test channel (built in ``.cache`` if missing) as a channel alias."""
    channel = build_channel(
        REPO / ".cache" / "offline-channel", ["numpy", "pandas"], log=lambda _: None
    )
    return channel.alias_url


def in_process_worker(root: Path, alias: str, **settings: object) -> CondaWorker:
    """A worker used in this process (no Hypha in between), folders under ``root``; no
    warm kernels unless asked, so a start measures a kernel start."""
    return CondaWorker(
        Settings(
            cache_dir=root / "cache",
            working_dir=root / "sessions",
            channel_alias=alias,
            **{"kernel_pool_size": 0, **settings},
        )
    )


async def quiet(_: dict) -> None:
    """A progress sink for work nobody watches."""


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    """Seconds ``action()`` took."""
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def median_ms(call: Callable[[], Awaitable[object]], n: int) -> float:
    """Median of ``n`` calls, in milliseconds."""
    return statistics.median([await timed(call) for _ in range(n)]) * 1000


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb(pid: int) -> float:
    """Resident memory of one process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, MB: a sandboxed kernel is the bwrap
    process that was launched, bwrap's init inside the sandbox, and the kernel."""
    root = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
