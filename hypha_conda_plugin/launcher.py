"""Starting a kernel in an instance folder: sandbox, environment variables, limits.

The one place that knows how a kernel of a session is started, used for fresh starts and
for the warm pool alike, so a pooled kernel is started exactly as a fresh one would be.
Only what every session shares goes into the launch (no app token, no session id):
session-specific variables are applied by :func:`session_bootstrap` before any user code
runs, on fresh and pooled kernels the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

from hypha_conda_plugin.childenv import clean_env
from hypha_conda_plugin.envs.prefix import python_version
from hypha_conda_plugin.instances import RUN_MARKER_VARIABLE, Instance
from hypha_conda_plugin.kernel import Kernel
from hypha_conda_plugin.outputs import DEFAULT_MAX_OUTPUT_BYTES
from hypha_conda_plugin.sandbox import Sandbox, child_setup, with_memory_limit

#: Kernels run below the Hypha server's CPU priority: busy cells share what the server
#: leaves, and the server keeps answering every user (see kernel_bootstrap).
KERNEL_NICENESS = 19


class KernelLauncher:
    """Starts kernels for one worker run: every kernel gets the same confinement."""

    def __init__(
        self,
        sandbox: Sandbox,
        *,
        run_id: str,
        start_timeout: float,
        memory_limit: int | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    ) -> None:
        self.sandbox = sandbox
        self.run_id = run_id
        self.start_timeout = start_timeout
        self.memory_limit = memory_limit
        self.max_output_bytes = max_output_bytes
        self._python_versions: dict[Path, str | None] = {}

    async def start(self, instance: Instance, prefix: Path) -> Kernel:
        """Create the instance's folders and start a kernel in them, confined."""
        version = await self.python_version_of(prefix)
        await asyncio.to_thread(instance.create, version)
        kernel = self.kernel_for(instance, prefix)
        await kernel.start(timeout=self.start_timeout)
        return kernel

    def kernel_for(self, instance: Instance, prefix: Path) -> Kernel:
        """The (not yet started) kernel of an instance whose folders exist."""
        env = clean_env(prefix, extra={**instance.kernel_env(), RUN_MARKER_VARIABLE: self.run_id})
        # A session's own `pip install` lands in its user site (see Instance.kernel_env).
        env.pop("PYTHONNOUSERSITE", None)

        def wrap(argv: list[str]) -> list[str]:
            return self.sandbox.command(
                with_memory_limit(argv, self.memory_limit),
                instance_root=instance.root,
                tmp_dir=instance.tmp,
                passwd_file=instance.passwd_file,
                read_only=[prefix],
                cwd=instance.work,
            )

        return Kernel(
            prefix / "bin" / "python",
            cwd=instance.work,
            env=env,
            log_path=instance.kernel_dir / "kernel.log",
            runtime_dir=instance.kernel_dir,
            max_output_bytes=self.max_output_bytes,
            niceness=KERNEL_NICENESS,
            wrap=wrap if self.sandbox.enabled else None,
            # Without a sandbox, the limit and a parent-death signal are set between fork
            # and exec. With it, bwrap dies with us and the limit is set inside, so the
            # server can spawn with vfork (a fork of the whole server process would stall
            # its event loop for milliseconds per kernel).
            preexec_fn=None
            if self.sandbox.enabled
            else child_setup(self.memory_limit, die_with_parent=True),
        )

    async def python_version_of(self, prefix: Path) -> str | None:
        """The environment's ``3.X`` (cached: environments do not change)."""
        if prefix not in self._python_versions:
            self._python_versions[prefix] = await asyncio.to_thread(python_version, prefix)
        return self._python_versions[prefix]


def session_bootstrap(variables: Mapping[str, str]) -> str:
    """Code that gives a started kernel its session's variables (``HYPHA_*`` of an app).

    Run silently before any user code, so the session's code, and every process it
    starts, sees them exactly as if the kernel had been launched with them.
    """
    payload = json.dumps(dict(variables))
    return f"import os as _o, json as _j\n_o.environ.update(_j.loads({payload!r}))\ndel _o, _j\n"
