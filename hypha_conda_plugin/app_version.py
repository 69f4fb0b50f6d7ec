"""Which version of an app's files a start should read.

Hypha's app controller resolves ``start(app_id, version=..., stage=...)`` to a manifest,
but tells the worker only that manifest: no version, no stage. Its file URLs without
``version=`` serve the latest committed files, so a start at ``v0`` (or of a new version
still being staged) would run the wrong ``main.py`` with the wrong data.

The worker works it out in this order:

1. **Said explicitly**: ``additional_kwargs={"stage": True}`` or ``{"version": "v0"}`` on
   the controller's ``start`` (or ``commit_app``/``install``) arrive as config keys and
   win. This is the only way to tell apart two versions whose manifests are identical.
2. **Matched**: otherwise the worker reads the artifact's committed versions and its
   staged version through the artifact manager's HTTP API (with the app's token) and
   picks the one whose manifest is the one it was given. Hypha hands the manifest over
   after passing it through its ``ApplicationManifest`` model, which fills in defaults,
   so a stored manifest matches when every non-empty field it has is equal in the given
   one; when several match, the one with most matching fields wins, and then the latest
   committed version, the stage, and older versions newest first, in that order, so
   staged (unreleased) files are never picked over committed ones on a tie.
3. **Fallback**: nothing to compare (one committed version and no stage), or the
   versions cannot be read: the latest committed files, as before.

Every choice is reported in the session's progress and logs. A staged edit of the
current version (Hypha's default ``edit(stage=True)``) writes into that version's own
file slot, so there stage and latest serve the same files anyway; the distinction
matters for a new version being staged (``edit(stage=True, version="new")``, or
``install(stage=True)`` of a new app) and for older versions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.errors import CondaWorkerError

#: Committed versions compared at most (newest first); older ones are not considered.
MAX_VERSIONS_COMPARED = 20

Progress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class _Choice:
    """A version to read: the staged files, or a committed version by name."""

    stage: bool = False
    version: str | None = None

    def apply(self, files: AppFiles) -> AppFiles:
        return dataclasses.replace(files, stage=self.stage, version=self.version)

    def label(self) -> str:
        return "the staged files" if self.stage else f"version {self.version}"


async def choose_version(
    files: AppFiles,
    config: Mapping[str, Any],
    manifest: Mapping[str, Any],
    progress: Progress,
) -> AppFiles:
    """``files`` set to read the version or stage this start is for (see module doc)."""
    choice = _explicit(config)
    why = "as the start asked"
    if choice is None:
        if files.stage or files.version is not None:
            return files
        choice, why = await _matched(files, manifest)
    if choice is None:
        if why:
            await progress(
                {
                    "type": "warning",
                    "stage": "app_files",
                    "message": f"Reading the app's latest committed files: {why}",
                }
            )
        return files
    await progress(
        {
            "type": "info",
            "stage": "app_files",
            "message": f"Reading {choice.label()} of the app ({why})",
        }
    )
    return choice.apply(files)


def _explicit(config: Mapping[str, Any]) -> _Choice | None:
    """The version the start names through ``additional_kwargs``, if any."""
    stage, version = config.get("stage"), config.get("version")
    if stage is not None and not isinstance(stage, bool):
        raise CondaWorkerError(f"config['stage'] must be true or false, got {stage!r}.")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
        raise CondaWorkerError(
            f"config['version'] must be a version name such as 'v0' (or its index), got "
            f"{version!r}."
        )
    if stage and version is not None:
        raise CondaWorkerError(
            "Give either config['stage'] (the staged files) or config['version'], not both."
        )
    if stage:
        return _Choice(stage=True)
    if version is not None:
        return _Choice(version=str(version))
    return None


async def _matched(files: AppFiles, manifest: Mapping[str, Any]) -> tuple[_Choice | None, str]:
    """The version or stage whose stored manifest is the one the start was given."""
    base = files.base_url.rstrip("/")
    if not base.endswith("/files"):
        return None, ""
    artifact_url = base.removesuffix("/files")
    async with files.client(max_connections=2) as client:
        try:
            staged_info = await _read(client, artifact_url, "stage")
        except _Unreadable as error:
            return None, f"its versions could not be read ({error})"
        versions = [str(v.get("version")) for v in staged_info.get("versions") or []]
        staged = staged_info.get("staging") is not None
        if not staged and len(versions) <= 1:
            return None, ""  # one candidate: the latest committed files, read as before
        given = _canonical(manifest)
        candidates: list[tuple[_Choice, str, Callable[[], Awaitable[Mapping[str, Any]]]]] = []
        newest_first = list(reversed(versions))[:MAX_VERSIONS_COMPARED]
        if newest_first:
            latest = newest_first[0]
            candidates.append(
                (
                    _Choice(version=latest),
                    f"its manifest is the latest version's ({latest})",
                    _reader(client, artifact_url, latest, staged_info if not staged else None),
                )
            )
        if staged:
            candidates.append(
                (
                    _Choice(stage=True),
                    "its manifest is the staged one",
                    _reader(client, artifact_url, "stage", staged_info),
                )
            )
        for name in newest_first[1:]:
            candidates.append(
                (
                    _Choice(version=name),
                    f"its manifest is version {name}'s",
                    _reader(client, artifact_url, name, None),
                )
            )
        best: tuple[int, _Choice, str] | None = None
        for choice, why, read in candidates:
            try:
                stored = _canonical(await read())
            except _Unreadable:
                continue
            if stored == given:
                best = (len(stored) + 1, choice, why)  # exact: nothing can beat it
                break
            if _is_subset(stored, given) and (best is None or len(stored) > best[0]):
                best = (len(stored), choice, why)
    if best is None:
        return None, "no version's manifest matches the one the start was given"
    return best[1], best[2]


def _reader(
    client: httpx.AsyncClient, url: str, version: str, known: Mapping[str, Any] | None
) -> Callable[[], Awaitable[Mapping[str, Any]]]:
    async def read() -> Mapping[str, Any]:
        info = known if known is not None else await _read(client, url, version)
        return info.get("manifest") or {}

    return read


class _Unreadable(Exception):
    pass


async def _read(client: httpx.AsyncClient, url: str, version: str) -> Mapping[str, Any]:
    """The artifact at a version ("stage" for the staged one), without counting a view."""
    try:
        response = await client.get(url, params={"version": version, "silent": "true"})
    except httpx.HTTPError as error:
        raise _Unreadable(str(error)) from error
    if response.status_code != 200:
        raise _Unreadable(f"HTTP {response.status_code}")
    try:
        info = response.json()
    except ValueError as error:
        raise _Unreadable("not JSON") from error
    if not isinstance(info, dict):
        raise _Unreadable("not an artifact")
    return info


def _canonical(value: Any) -> Any:
    """A manifest with empty fields (None, "", [], {}, False) left out, recursively, so a
    stored manifest and Hypha's model dump of it (defaults filled in) compare alike."""
    if isinstance(value, Mapping):
        items = ((str(k), _canonical(v)) for k, v in value.items())
        return {k: v for k, v in items if v not in (None, "", [], {}, False)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _is_subset(stored: Mapping[str, Any], given: Mapping[str, Any]) -> bool:
    def same(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(
            b, sort_keys=True, default=str
        )

    return all(key in given and same(value, given[key]) for key, value in stored.items())
