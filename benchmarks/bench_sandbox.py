"""What the kernel sandbox costs: kernel start, execute and memory with and without it.

The same environment, the same launcher, the same instance folders; only the sandbox
differs (``Sandbox(None)`` is the unsandboxed mode). Runs alternate between the two so
machine noise hits both alike. Goal: under 20 ms added to a kernel start.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from measure import in_process_worker, offline_alias, quiet, tree_rss_mb  # noqa: E402
from tables import print_table  # noqa: E402

from hypha_conda_plugin.envs.spec import EnvSpec  # noqa: E402
from hypha_conda_plugin.instances import WorkingRoot  # noqa: E402
from hypha_conda_plugin.launcher import KernelLauncher  # noqa: E402
from hypha_conda_plugin.sandbox import UNSANDBOXED_GUARANTEES, Isolation, Sandbox  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--executes", type=int, default=30)
    args = parser.parse_args()
    alias = offline_alias()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        worker = in_process_worker(root, alias)
        sandbox = await worker.prepare()
        if not sandbox.enabled:
            print(f"The sandbox cannot run here ({sandbox.isolation.detail}); nothing to compare.")
            return
        env = await worker.envs.acquire(EnvSpec.from_manifest({"dependencies": ["python"]}), quiet)
        await asyncio.sleep(5)  # let the background bytecode compile settle
        folders = WorkingRoot(root / "bench")
        await folders.open()
        plain = Sandbox(None, Isolation("none", "benchmark", UNSANDBOXED_GUARANTEES))
        launchers = {
            "without sandbox (baseline)": KernelLauncher(plain, run_id="b", start_timeout=60),
            "in the bwrap sandbox": KernelLauncher(sandbox, run_id="b", start_timeout=60),
        }
        starts = {label: [] for label in launchers}
        executes = {label: [] for label in launchers}
        memory = {label: [] for label in launchers}
        for _ in range(args.runs):
            for label, launcher in launchers.items():
                instance = folders.new_instance()
                began = time.perf_counter()
                kernel = await launcher.start(instance, env.prefix)
                starts[label].append(time.perf_counter() - began)
                for _ in range(args.executes):
                    began = time.perf_counter()
                    await kernel.execute("1 + 1")
                    executes[label].append(time.perf_counter() - began)
                memory[label].append(tree_rss_mb(kernel.pid))
                await kernel.shutdown()
                await asyncio.to_thread(instance.remove)
        await folders.close()
        await worker.close()

    base = "without sandbox (baseline)"
    med = statistics.median
    print(f"{args.runs} kernel starts each, alternating; {sandbox.isolation.detail}")
    for title, values, unit, scale in (
        ("Kernel start (python + ipykernel environment)", starts, "ms", 1000),
        ("Execute '1 + 1'", executes, "ms", 1000),
        ("Kernel memory (RSS of the process tree)", memory, "MB", 1),
    ):
        rows = [
            (label, med(values[label]) * scale, med(values[label]) / med(values[base]))
            for label in launchers
        ]
        print_table(title, rows, unit)
    added = (med(starts["in the bwrap sandbox"]) - med(starts[base])) * 1000
    print(f"\nThe sandbox adds {added:.1f} ms to a kernel start (median).")


if __name__ == "__main__":
    asyncio.run(main())
