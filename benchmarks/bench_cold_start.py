"""The first start in a new environment, end to end, and the starts right after it.

Environments are complete before sessions use them (the bytecode a kernel needs is
compiled before the first kernel starts, the rest in the background, then the
environment is sealed read-only). This measures what that costs a user, medians over
``--runs``, each run on an empty environment cache with a warm package cache, with the
worker used in-process (no Hypha in between) and no warm kernels (so a later start is a
real kernel start):

* ours: ``start`` of a python + numpy session on a new environment until it is ready,
  then its first ``import numpy``; then a second session on the same environment
  (1 s later), its start and ``import numpy``;
* baseline, in the same run: what the worker did before environments were completed and
  sealed: raw py-rattler solve + install into an empty prefix, then a bare
  jupyter_client kernel on it (which writes bytecode as it imports), its ``import
  numpy``, then a second bare kernel and its ``import numpy``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_cache import RAW  # noqa: E402
from measure import in_process_worker, offline_alias  # noqa: E402
from tables import print_table  # noqa: E402

from hypha_conda_plugin.envs.spec import EnvSpec  # noqa: E402

MANIFEST = {"dependencies": ["python", "numpy"]}
CTX = {"ws": "bench", "user": {"id": "bench-user"}}
IMPORT = "import numpy"


async def ours(root: Path, alias: str) -> dict[str, float]:
    """One cold start, its first import, and the second session after it."""
    worker = in_process_worker(root, alias)
    times: dict[str, float] = {}
    try:
        await worker.prepare()  # once per worker process (sandbox probe), not per start
        began = time.perf_counter()
        first = await worker.start({"id": "first", "manifest": MANIFEST}, context=CTX)
        times["start"] = time.perf_counter() - began
        began = time.perf_counter()
        result = await worker.execute(first, IMPORT, context=CTX)
        times["import"] = time.perf_counter() - began
        assert result["status"] == "ok", result
        await asyncio.sleep(1)
        began = time.perf_counter()
        second = await worker.start({"id": "second", "manifest": MANIFEST}, context=CTX)
        times["start2"] = time.perf_counter() - began
        began = time.perf_counter()
        result = await worker.execute(second, IMPORT, context=CTX)
        times["import2"] = time.perf_counter() - began
        assert result["status"] == "ok", result
    finally:
        await worker.close()
    return times


async def baseline(root: Path, alias: str) -> dict[str, float]:
    """Raw rattler install, then bare kernels that write their own bytecode."""
    spec = EnvSpec.from_manifest(MANIFEST)
    prefix = root / "raw-env"
    job = {
        "alias": alias,
        "channels": list(spec.channels),
        "specs": list(spec.conda),
        "prefix": str(prefix),
        "pkgs": str(root / "cache" / "pkgs"),
        "repodata": str(root / "raw-repodata"),
    }
    began = time.perf_counter()
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", RAW, json.dumps(job)],
        capture_output=True,
        check=True,
    )
    install = time.perf_counter() - began
    first_start, first_import = await bare_kernel(prefix / "bin" / "python", root / "k1")
    await asyncio.sleep(1)
    second_start, second_import = await bare_kernel(prefix / "bin" / "python", root / "k2")
    return {
        "start": install + first_start,
        "import": first_import,
        "start2": second_start,
        "import2": second_import,
    }


async def bare_kernel(python: Path, folder: Path) -> tuple[float, float]:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec_dir = folder / "kernels" / "raw"
    spec_dir.mkdir(parents=True)
    argv = [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "language": "python", "display_name": "raw"})
    )
    km = AsyncKernelManager(
        kernel_name="raw",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder / "kernels")]),
    )
    # As the worker's kernels used to run: writing their bytecode (this machine's own
    # PYTHONDONTWRITEBYTECODE would make every bare kernel compile all again).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    began = time.perf_counter()
    await km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    await kc.wait_for_ready(timeout=60)
    start = time.perf_counter() - began
    began = time.perf_counter()
    reply = await kc.execute_interactive(IMPORT, timeout=60, output_hook=lambda _: None)
    imported = time.perf_counter() - began
    assert reply["content"]["status"] == "ok", reply
    kc.stop_channels()
    await km.shutdown_kernel(now=True)
    return start, imported


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    alias = offline_alias()
    ours_runs: list[dict[str, float]] = []
    base_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = in_process_worker(root, alias)  # fills the package cache both sides then use
        await warm.start({"id": "prime", "manifest": MANIFEST}, context=CTX)
        await warm.close()
        for run in range(args.runs):
            # Alternate who goes first, so neither side always meets a busier machine.
            for side in ("ours", "base") if run % 2 == 0 else ("base", "ours"):
                shutil.rmtree(root / "cache" / "envs", ignore_errors=True)
                shutil.rmtree(root / "sessions", ignore_errors=True)
                for leftover in ("raw-env", "k1", "k2"):
                    shutil.rmtree(root / leftover, ignore_errors=True)
                if side == "ours":
                    ours_runs.append(await ours(root, alias))
                else:
                    base_runs.append(await baseline(root, alias))

    def med(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(run[key] for run in runs) * 1000

    rows = []
    for label, key in (
        ("new environment: start until ready", "start"),
        ("  then first 'import numpy'", "import"),
        ("second session: start (no warm kernel)", "start2"),
        ("  then its 'import numpy'", "import2"),
    ):
        base, our = med(base_runs, key), med(ours_runs, key)
        rows.append((f"{label}, baseline", base, 1.0))
        rows.append((label, our, our / base))
    total_base = med(base_runs, "start") + med(base_runs, "import")
    total_ours = med(ours_runs, "start") + med(ours_runs, "import")
    rows.append(("cold start + first import, baseline", total_base, 1.0))
    rows.append(("cold start + first import", total_ours, total_ours / total_base))
    print(
        f"python + numpy, warm package cache, {args.runs} runs; baseline: raw py-rattler "
        "install + bare jupyter_client kernels on a writable environment"
    )
    print_table("Cold start, end to end (medians)", rows, "ms")


if __name__ == "__main__":
    asyncio.run(main())
