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
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_cache import raw_install  # noqa: E402
from measure import (  # noqa: E402
    bare_execute,
    in_process_worker,
    offline_alias,
    start_bare_kernel,
    stop_bare_kernel,
)
from tables import print_table  # noqa: E402

from hypha_conda_plugin.envs.spec import EnvSpec  # noqa: E402
from hypha_conda_plugin.worker import CondaWorker  # noqa: E402

MANIFEST = {"dependencies": ["python", "numpy"]}
SPEC = EnvSpec.from_manifest(MANIFEST)
CTX = {"ws": "bench", "user": {"id": "bench-user"}}
IMPORT = "import numpy"


async def ours(root: Path, alias: str) -> dict[str, float]:
    """One cold start, its first import, and the second session after it."""
    worker = in_process_worker(root, alias)
    try:
        await worker.prepare()  # once per worker process (sandbox probe), not per start
        start, imported = await session_then_import(worker, "first")
        await asyncio.sleep(1)
        start2, imported2 = await session_then_import(worker, "second")
    finally:
        await worker.close()
    return {"start": start, "import": imported, "start2": start2, "import2": imported2}


async def session_then_import(worker: CondaWorker, sid: str) -> tuple[float, float]:
    """Seconds to start session ``sid`` and to run its first ``import numpy``."""
    began = time.perf_counter()
    await worker.start({"id": sid, "manifest": MANIFEST}, context=CTX)
    started = time.perf_counter()
    result = await worker.execute(sid, IMPORT, context=CTX)
    assert result["status"] == "ok", result
    return started - began, time.perf_counter() - started


async def baseline(root: Path, alias: str) -> dict[str, float]:
    """Raw rattler install, then bare kernels that write their own bytecode. The install
    is timed whole (child start included, as our build's is)."""
    began = time.perf_counter()
    await asyncio.to_thread(raw_install, root, alias, root / "cache" / "pkgs", SPEC)
    install = time.perf_counter() - began
    python = root / "raw-env" / "bin" / "python"
    first_start, first_import = await bare_kernel_then_import(python, root / "k1")
    await asyncio.sleep(1)
    second_start, second_import = await bare_kernel_then_import(python, root / "k2")
    return {
        "start": install + first_start,
        "import": first_import,
        "start2": second_start,
        "import2": second_import,
    }


async def bare_kernel_then_import(python: Path, folder: Path) -> tuple[float, float]:
    began = time.perf_counter()
    km, kc = await start_bare_kernel(python, folder)
    started = time.perf_counter()
    reply = await bare_execute(kc, IMPORT)
    imported = time.perf_counter() - started
    await stop_bare_kernel(km, kc)
    assert reply["content"]["status"] == "ok", reply
    return started - began, imported


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
