"""Building an environment with the operator's own mamba, micromamba or conda.

One command per build, as an argument list (no shell)::

    TOOL create --prefix PREFIX --override-channels -c CHANNEL... --file SPECS --yes --json

Channels are passed resolved (``CONDA_CHANNEL_ALIAS`` applied when it is set, names
left to the tool's own ``channel_alias`` otherwise) and ``--override-channels`` keeps
the rc file's channel list out, so the environment is exactly the manifest's. Everything
else comes from the tool's own configuration (mirrors, proxies, tokens, solver, package
cache), which the child finds through HOME, CONDARC and MAMBARC. The specs go in a file
next to the prefix rather than on the command line: Linux refuses an argument over
128 KiB, and a spec file keeps every spec an operand, never an option.

``--json`` gives a structured result: conda's error document names the exception
(``PackagesNotFoundError``, ``UnsatisfiableError``, ...), the packages and the channels;
mamba 2 reports ``solver_problems``. That is how a request that cannot be met (fail at
once, quoting the tool) is told apart from a tool that is itself broken
(``PackageManagerError``: the next tool is tried). In JSON mode the tools print no
stage lines when not on a terminal, so progress is the start, the stage lines and
download records a tool does print, a heartbeat while it works, and the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypha_conda_plugin.callbacks import Progress
from hypha_conda_plugin.envs.builders import BuildResult
from hypha_conda_plugin.envs.child_process import ChildResult, ChildTimeout, run_child
from hypha_conda_plugin.envs.spec import EnvSpec, resolve_channel
from hypha_conda_plugin.errors import EnvironmentBuildError, PackageManagerError

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 20.0
QUOTE_CHARS = 8000

# conda exceptions (``exception_name`` of its JSON error) that mean the request cannot be
# met as asked; any tool reading the same channels would fail the same way.
REQUEST_ERRORS = frozenset(
    {
        "PackagesNotFoundError",
        "PackagesNotFoundInChannelsError",
        "ResolvePackageNotFound",
        "SpecsConfigurationConflictError",
        "InvalidSpec",
        "InvalidVersionSpec",
        "InvalidMatchSpec",
        "DisallowedPackageError",
        "CyclicalDependencyError",
        "ChannelError",
        "ChannelNotAllowed",
        "ChannelDenied",
        "UnavailableInvalidChannel",
        "NoChannelsConfiguredError",
        "CondaHTTPError",
        "AuthenticationError",
        "OfflineError",
        "NoSpaceLeftError",
    }
)
# The same, in the words of mamba/micromamba (their errors are log lines, not JSON).
REQUEST_PATTERN = re.compile(
    r"could not solve for environment specs|nothing provides|"
    r"following packages are incompatible|does not exist \(perhaps a typo|"
    r"no match for|not accessible or is invalid|invalid (match ?)?spec|"
    r"packages ?not ?found|unsatisfiable",
    re.IGNORECASE,
)
# Stage lines conda and mamba print (conda in text mode, mamba on stderr).
STAGES = (
    ("Collecting package metadata", "metadata", "collecting package metadata", 0.1),
    ("Solving environment", "solve", "solving the environment", 0.3),
    ("Downloading and Extracting", "download", "downloading and extracting packages", 0.5),
    ("Preparing transaction", "install", "preparing the transaction", 0.7),
    ("Verifying transaction", "install", "verifying the transaction", 0.75),
    ("Executing transaction", "install", "linking packages", 0.8),
    ("Transaction starting", "install", "linking packages", 0.8),
)


@dataclass(frozen=True)
class Tool:
    """A package manager found on this machine, and the command that runs it."""

    name: str
    command: tuple[str, ...]
    path: Path
    source: str


class CliBuilder:
    """A Builder that runs ``TOOL create`` for one of mamba, micromamba, conda."""

    def __init__(
        self,
        tool: Tool,
        *,
        channel_alias: str | None,
        timeout: float,
        env: Mapping[str, str],
    ) -> None:
        self.tool = tool
        self.name = tool.name
        self.channel_alias = channel_alias
        self.timeout = timeout
        self.env = dict(env)

    def command(self, prefix: Path, channels: list[str], spec_file: Path) -> list[str]:
        """The argument list of one build (same flags for conda, mamba 1/2, micromamba)."""
        channel_args = [arg for channel in channels for arg in ("-c", channel)]
        return [
            *self.tool.command,
            "create",
            "--prefix",
            str(prefix),
            "--override-channels",
            *channel_args,
            "--file",
            str(spec_file),
            "--yes",
            "--json",
        ]

    async def build(self, spec: EnvSpec, prefix: Path, progress: Progress) -> BuildResult:
        _check_specs(spec)
        channels = [resolve_channel(c, self.channel_alias) for c in spec.channels]
        spec_file = prefix.with_name(f".{prefix.name}.specs.txt")
        await asyncio.to_thread(_write_specs, spec_file, spec.conda)
        reporter = _StageReporter(self.name, progress)
        await reporter.report(
            "start",
            f"creating the environment from {len(spec.conda)} specs with channels "
            + ", ".join(channels),
            0.0,
        )
        heartbeat = asyncio.create_task(reporter.heartbeat())
        try:
            result = await run_child(
                self.command(prefix, channels, spec_file),
                env=self.env,
                timeout=self.timeout,
                on_stdout=reporter.on_record,
                on_stderr=reporter.on_record,
                stdout_separators=b"\n\0",
                keep_stdout=True,
            )
        except ChildTimeout as error:
            raise EnvironmentBuildError(
                f"{self.name} took longer than {self.timeout:.0f} s to build the environment "
                "and was stopped. Pin versions to make the solve smaller, or raise "
                "CONDA_BUILD_TIMEOUT."
            ) from error
        except OSError as error:
            if error.errno == errno.E2BIG:
                raise EnvironmentBuildError(
                    f"The manifest's channels are too long to pass to {self.name}: {error}"
                ) from error
            raise PackageManagerError(
                f"{self.name} at {self.tool.path} could not be run: {error}"
            ) from error
        finally:
            heartbeat.cancel()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(spec_file.unlink, True)
        # A big environment's result (or a huge error) is megabytes of JSON: off the loop.
        document = await asyncio.to_thread(_final_document, result.stdout)
        if not await self._succeeded(result, document, prefix):
            raise self._failure(result, document, channels)
        packages = _linked(document) or await asyncio.to_thread(_installed, prefix)
        await reporter.report("done", f"installed {len(packages)} packages", 1.0)
        return BuildResult(packages=tuple(packages))

    async def _succeeded(
        self, result: ChildResult, document: dict[str, Any] | None, prefix: Path
    ) -> bool:
        said_success = bool(document and document.get("success") is True)
        if result.returncode != 0 and not said_success:
            return False
        # Trust the environment, not only the words: a tool can crash while it exits
        # after doing its work (the JSON says success), or exit 0 having done nothing.
        if not await asyncio.to_thread(_has_python, prefix):
            raise PackageManagerError(
                f"{self.name} exited with code {result.returncode} but left no usable "
                f"environment at {prefix}.\n" + _quote(result, document)
            )
        if result.returncode != 0:
            logger.warning(
                "%s reported success but exited with %s; the environment is complete",
                self.name,
                _describe_exit(result.returncode),
            )
        return True

    def _failure(
        self, result: ChildResult, document: dict[str, Any] | None, channels: list[str]
    ) -> EnvironmentBuildError:
        where = "Channels: " + ", ".join(channels)
        hint = (
            "Check that every package exists in those channels and that the version "
            "constraints can be met together."
        )
        if document and document.get("exception_name"):
            name = str(document["exception_name"])
            text = str(document.get("error") or f"{name}: {document.get('message', '')}")
            if name in REQUEST_ERRORS or name.endswith("UnsatisfiableError"):
                return EnvironmentBuildError(
                    f"{self.name} could not build the environment:\n{text.strip()}\n{where}\n{hint}"
                )
            return PackageManagerError(
                f"{self.name} failed with {name} ({_describe_exit(result.returncode)}):\n"
                f"{_clip(text.strip())}\n{_clip(result.stderr_tail)}".rstrip()
            )
        problems = document.get("solver_problems") if document else None
        if problems:
            listed = "\n".join(map(str, problems)) if isinstance(problems, list) else problems
            said = "\n".join(part for part in (str(listed), result.stderr_tail.strip()) if part)
            return EnvironmentBuildError(
                f"{self.name} could not solve the environment:\n{said}\n{where}\n{hint}"
            )
        said = result.stderr_tail + "\n" + _plain_stdout(result.stdout)
        if REQUEST_PATTERN.search(said):
            return EnvironmentBuildError(
                f"{self.name} could not build the environment:\n{said.strip()}\n{where}\n{hint}"
            )
        return PackageManagerError(
            f"{self.name} failed ({_describe_exit(result.returncode)}) without reporting a "
            f"problem with the request:\n{_quote(result, document)}"
        )


class _StageReporter:
    """Turns what a tool prints into progress messages that name the tool."""

    def __init__(self, tool: str, progress: Progress) -> None:
        self.tool = tool
        self.progress = progress
        self.started = time.monotonic()
        self.last = self.started
        self.seen: set[str] = set()

    async def report(self, stage: str, message: str, fraction: float | None) -> None:
        self.last = time.monotonic()
        await self.progress(
            {
                "type": "info",
                "stage": f"build:{stage}",
                "message": f"{self.tool}: {message}",
                "progress": fraction,
            }
        )

    async def on_record(self, raw: bytes) -> None:
        if len(raw) > 4096:
            return  # a result document or an explanation, not a stage line
        line = raw.decode(errors="replace").strip()
        if line.startswith('{"fetch"'):
            with contextlib.suppress(ValueError, AttributeError):
                record = json.loads(line)
                if record.get("finished"):
                    name = str(record.get("fetch", "")).split("|")[0].strip()
                    await self.report("download", f"fetched {name}", None)
            return
        for marker, stage, message, fraction in STAGES:
            if marker in line and marker not in self.seen:
                self.seen.add(marker)
                await self.report(stage, message, fraction)
                return

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if time.monotonic() - self.last >= HEARTBEAT_SECONDS:
                elapsed = time.monotonic() - self.started
                await self.report("wait", f"still working ({elapsed:.0f} s)", None)


def _check_specs(spec: EnvSpec) -> None:
    for item in spec.conda:
        if item.startswith(("#", "@")):
            # In a spec file these are comments and directives (@EXPLICIT), not specs.
            raise EnvironmentBuildError(
                f"Dependency {item!r} is not a conda package spec; remove it from the "
                "manifest's 'dependencies'."
            )


def _write_specs(path: Path, specs: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{item}\n" for item in specs))


def _final_document(stdout: bytes) -> dict[str, Any] | None:
    """The JSON document a tool prints last (conda separates progress records by NUL)."""
    for piece in reversed(stdout.split(b"\0")):
        text = piece.strip()
        if not text:
            continue
        start = text.find(b"{")
        if start < 0:
            return None
        with contextlib.suppress(ValueError):
            document = json.loads(text[start:])
            return document if isinstance(document, dict) else None
        return None
    return None


def _plain_stdout(stdout: bytes) -> str:
    """What a tool printed on stdout that is not its JSON, for error messages."""
    text = stdout.decode(errors="replace").strip()
    return "" if text.startswith("{") else text[-QUOTE_CHARS:]


def _linked(document: dict[str, Any] | None) -> list[str]:
    actions = (document or {}).get("actions")
    links = actions.get("LINK") if isinstance(actions, dict) else None
    if not isinstance(links, list):
        return []
    packages = []
    for link in links:
        if isinstance(link, dict) and link.get("name"):
            build = link.get("build_string") or link.get("build") or ""
            packages.append(f"{link['name']}={link.get('version', '')}={build}")
    return sorted(packages)


def _installed(prefix: Path) -> list[str]:
    """name=version=build of every package in ``conda-meta`` (tools that print no list)."""
    packages = []
    for record in (prefix / "conda-meta").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(record.read_text())
            packages.append(f"{data['name']}={data['version']}={data['build']}")
    return sorted(packages)


def _has_python(prefix: Path) -> bool:
    return (prefix / "conda-meta").is_dir() and (prefix / "bin" / "python").exists()


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"exit code {code}, {signal.Signals(code - 128).name}"
    return f"exit code {code}"


def _clip(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + " ..."


def _quote(result: ChildResult, document: dict[str, Any] | None) -> str:
    parts = [result.stderr_tail.strip(), _plain_stdout(result.stdout)]
    if document:
        parts.append(_clip(json.dumps(document)))
    return _clip("\n".join(part for part in parts if part)) or "(it printed nothing)"
