"""Small measuring helpers the benchmark scripts share."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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


async def start_bare_kernel(python: Path, folder: Path) -> tuple[Any, Any]:
    """The baselines' kernel: plain jupyter_client and ipykernel on ``python``, no worker,
    no sandbox; (manager, client), ready. Its kernelspec is written under ``folder``.

    Like the worker's kernels, it may write bytecode (this machine's own
    PYTHONDONTWRITEBYTECODE would make every bare kernel compile everything again)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = folder / "kernels" / "raw"
    if not (spec_dir / "kernel.json").exists():
        spec_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        (spec_dir / "kernel.json").write_text(
            json.dumps({"argv": argv, "language": "python", "display_name": "raw"})
        )
    km = AsyncKernelManager(
        kernel_name="raw",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir.parent)]),
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    await km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    return km, kc


async def stop_bare_kernel(km: Any, kc: Any) -> None:
    kc.stop_channels()
    await km.shutdown_kernel(now=True)


async def bare_execute(kc: Any, code: str = "1 + 1", timeout: float = 60) -> dict:
    """One cell through a bare kernel's client; its execute_reply."""
    return await kc.execute_interactive(code, timeout=timeout, output_hook=lambda _: None)
