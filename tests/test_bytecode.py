"""New environments are complete before their first kernel: what a kernel imports at start
has its bytecode, so no kernel (they see the environment read-only) compiles it again."""

from __future__ import annotations

import json
from pathlib import Path

from hypha_conda_plugin.envs.integrity import MARKER

#: Runs in the kernel: the environment's source files it has imported, and where their
#: bytecode goes. It imports nothing a kernel would not have imported at start.
ASK = """
import json, os, sys
_tag = sys.implementation.cache_tag
_files = sorted({
    m.__file__ for m in list(sys.modules.values())
    if (getattr(m, "__file__", None) or "").endswith(".py")
    and m.__file__.startswith(sys.prefix + os.sep)
    and getattr(m.__spec__, "origin", None) != "frozen"  # in the interpreter, no .pyc
})
print(json.dumps([
    [f, os.path.join(os.path.dirname(f), "__pycache__",
                     os.path.basename(f)[:-3] + "." + _tag + ".pyc")]
    for f in _files
]))
"""


async def test_a_kernels_start_up_bytecode_is_written_before_the_environment_is_ready(
    conda_worker,
):
    sid = await conda_worker.start({"id": "bytecode", "manifest": {"dependencies": ["python"]}})
    try:
        prefix = Path((await conda_worker.get_session_info(sid))["environment"])
        result = await conda_worker.execute(sid, ASK)
    finally:
        await conda_worker.stop(sid)
    assert result["status"] == "ok", result
    text = "".join(o["text"] for o in result["outputs"] if o.get("name") == "stdout")
    imported = json.loads(text)
    assert len(imported) > 300  # ipykernel, IPython, zmq, tornado and the stdlib they use
    ready = (prefix / MARKER).stat().st_mtime_ns
    # Compiled before the marker: by the step that completes a new environment, not by
    # the background pass that follows it (nor missing, to be compiled by every kernel).
    late = []
    for source, compiled in imported:
        path = Path(compiled)
        if not path.exists() or path.stat().st_mtime_ns > ready:
            late.append(source)
    assert not late, (
        f"{len(late)} of {len(imported)} start-up modules had no bytecode when the "
        f"environment became ready (re-run scripts/record_kernel_modules.py?): {late[:10]}"
    )
