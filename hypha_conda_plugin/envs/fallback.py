"""Trying package managers in order: when one breaks, the next one builds.

The spec promises that a failing mamba falls back to conda. "Failing" means the tool
itself (it crashes, is broken, cannot be executed), reported by a ``PackageManagerError``.
A request that cannot be met (an unsatisfiable spec, an unknown package or channel) is
the caller's to fix and would fail the same way with every tool, so it is raised at once
with the tool's own explanation.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.envs.builders import Builder, BuildResult
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import PackageManagerError

logger = logging.getLogger(__name__)


class FallbackBuilder:
    """A Builder made of builders tried in order; named after the first."""

    def __init__(self, builders: Sequence[Builder]) -> None:
        if not builders:
            raise ValueError("FallbackBuilder needs at least one builder")
        self.builders = tuple(builders)
        self.name = self.builders[0].name

    async def build(self, spec: EnvSpec, prefix: Path, progress: Progress) -> BuildResult:
        failures: list[str] = []
        for index, builder in enumerate(self.builders):
            try:
                return await builder.build(spec, prefix, progress)
            except PackageManagerError as error:
                failures.append(f"{builder.name}: {error}")
                # What the broken tool left behind must not mislead the next one.
                await asyncio.to_thread(shutil.rmtree, prefix, True)
                if index + 1 == len(self.builders):
                    raise PackageManagerError(
                        "No package manager could build the environment.\n" + "\n".join(failures)
                    ) from error
                following = self.builders[index + 1].name
                logger.warning(
                    "%s failed, trying %s: %s", builder.name, following, _first_lines(str(error))
                )
                await progress(
                    {
                        "type": "warning",
                        "stage": "build:fallback",
                        "message": f"{builder.name} failed, so trying {following} instead: "
                        + _first_lines(str(error)),
                    }
                )
        raise AssertionError("unreachable")


def _first_lines(text: str, lines: int = 6, chars: int = 2000) -> str:
    """Enough of a tool's message for a progress line; the full text is in the logs."""
    cut = "\n".join(text.splitlines()[:lines])
    return cut if len(cut) <= chars else cut[:chars] + " ..."
