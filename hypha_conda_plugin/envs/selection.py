"""Which package manager builds environments: mamba, then micromamba, then conda, then
the embedded solver.

Operators already run mamba or conda with their own ``.condarc`` (mirrors, proxies,
private channels with tokens, channel priority), and the spec promises mamba when it is
installed and conda otherwise. ``CONDA_PACKAGE_MANAGER`` (``--package-manager``) picks
one; ``auto`` takes the first found in that order on the PATH the worker started with,
or in ``MAMBA_EXE`` / ``CONDA_EXE`` (set by the tools' shell activation). The embedded
py-rattler builder ends every order, so a machine without any of them still works.

Everything here is a pure function of ``Settings`` (plus a look at the file system), so
the start-up messages and the builder the worker uses always agree.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from hypha_conda_plugin.childenv import package_manager_env
from hypha_conda_plugin.envs.builders import Builder, RattlerBuilder
from hypha_conda_plugin.envs.cli_builder import CliBuilder, Tool
from hypha_conda_plugin.envs.fallback import FallbackBuilder
from hypha_conda_plugin.settings import Settings

TOOL_ORDER = ("mamba", "micromamba", "conda")
EMBEDDED = "rattler"
EMBEDDED_LABEL = "the embedded solver (py-rattler)"


@dataclass(frozen=True)
class Selection:
    """The tools to try, in order (the embedded solver always comes last), and why."""

    tools: tuple[Tool, ...]
    reason: str
    requested_missing: bool = False

    @property
    def chosen(self) -> str:
        return self.tools[0].name if self.tools else EMBEDDED

    @property
    def order(self) -> tuple[str, ...]:
        return (*(tool.name for tool in self.tools), EMBEDDED)


def find_tool(name: str, settings: Settings) -> Tool | None:
    """``name`` on the worker's PATH, else in MAMBA_EXE (mamba, micromamba) or CONDA_EXE."""
    # Only absolute PATH entries: an empty or relative one would mean "the current
    # folder", and an empty search path would make shutil.which look there too.
    folders = [p for p in (settings.tool_search_path or "").split(os.pathsep) if p.startswith("/")]
    found = shutil.which(name, path=os.pathsep.join(folders)) if folders else None
    if found:
        return Tool(name, _command(name, Path(found)), Path(found), "PATH")
    variable, value = (
        ("CONDA_EXE", settings.conda_exe) if name == "conda" else ("MAMBA_EXE", settings.mamba_exe)
    )
    if value and Path(value).name == name and _executable(Path(value)):
        path = Path(value)
        return Tool(name, _command(name, path), path, variable)
    return None


def select_package_manager(settings: Settings) -> Selection:
    """The order of tools the worker builds with, from the setting and what is installed."""
    choice = settings.package_manager
    if choice == EMBEDDED:
        return Selection((), f"CONDA_PACKAGE_MANAGER=rattler: {EMBEDDED_LABEL} only")
    names = TOOL_ORDER if choice == "auto" else TOOL_ORDER[TOOL_ORDER.index(choice) :]
    tools = tuple(tool for tool in (find_tool(name, settings) for name in names) if tool)
    then = ", then ".join([*(t.name for t in tools[1:]), EMBEDDED_LABEL])
    if choice == "auto":
        if not tools:
            return Selection(
                (),
                "auto: no mamba, micromamba or conda on PATH or in MAMBA_EXE/CONDA_EXE, "
                f"so {EMBEDDED_LABEL}",
            )
        first = tools[0]
        return Selection(tools, f"auto: {_where(first)}; if it fails: {then}")
    if tools and tools[0].name == choice:
        return Selection(
            tools, f"CONDA_PACKAGE_MANAGER={choice}: {_where(tools[0])}; if it fails: {then}"
        )
    variable = "CONDA_EXE" if choice == "conda" else "MAMBA_EXE"
    using = tools[0].name if tools else EMBEDDED_LABEL
    return Selection(
        tools,
        f"CONDA_PACKAGE_MANAGER={choice}, but no {choice} on PATH or in {variable}; "
        f"using {using} instead (next in order). Install {choice} or fix PATH.",
        requested_missing=True,
    )


def make_builder(settings: Settings) -> Builder:
    """The builder the worker uses: the selected tools in order, then the embedded one."""
    selection = select_package_manager(settings)
    embedded = RattlerBuilder(
        pkgs_dir=settings.pkgs_dir,
        repodata_cache_dir=settings.cache_dir / "repodata",
        channel_alias=settings.channel_alias,
        timeout=settings.build_timeout,
    )
    if not selection.tools:
        return embedded
    builders: list[Builder] = [
        CliBuilder(
            tool,
            channel_alias=settings.channel_alias,
            timeout=settings.build_timeout,
            env=package_manager_env(tool.path.parent),
        )
        for tool in selection.tools
    ]
    return FallbackBuilder([*builders, embedded])


def _where(tool: Tool) -> str:
    launcher = f", run as `{shlex.join(tool.command)}`" if len(tool.command) > 1 else ""
    return f"{tool.name} found at {tool.path} ({tool.source}){launcher}"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _command(name: str, path: Path) -> tuple[str, ...]:
    """How to run the tool found at ``path``.

    pip's ``conda`` entry point refuses every command but ``init`` and ``info`` ("Conda
    has not been initialized"). A Python script that runs conda is therefore replaced by
    its interpreter with ``-m conda``, which behaves like the ``conda`` of an installer
    for every command. Anything else (a binary, mamba's scripts) runs as found.
    """
    if name != "conda":
        return (str(path),)
    head = b""
    with contextlib.suppress(OSError), path.open("rb") as handle:
        head = handle.read(4096)
    if not head.startswith(b"#!") or b"conda.cli" not in head:
        return (str(path),)
    shebang = head[2:].split(b"\n", 1)[0].decode(errors="replace").strip()
    interpreter = shebang.split()
    if not any(Path(token).name.startswith("python") for token in interpreter):
        return (str(path),)
    return (*interpreter, "-m", "conda")
