"""``files_to_stage`` rules: what a manifest may ask to copy into a session folder.

The rules come from the app's author and name paths on disk, so they are validated in
full before anything else happens (before an environment build, and already when the app
is installed): exactly ``"data.csv"``, ``"models/"``, ``"source.txt:renamed.txt"`` and
``"raw_data/:processed_data/"``, relative, without ``..``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypha_conda_plugin.errors import ManifestError


@dataclass(frozen=True)
class StageRule:
    """One ``files_to_stage`` entry: copy ``source`` (in the app's files) to ``target``
    (relative to the session folder). Both are plain relative paths without a trailing
    slash; ``is_dir`` says whether they name folders (copied recursively)."""

    source: str
    target: str
    is_dir: bool


def parse_stage_rules(raw: object) -> list[StageRule]:
    """Validate a manifest's ``files_to_stage`` and return its rules.

    Runs before any environment is built, so a typo costs a second, not a build. Accepts
    exactly ``"data.csv"``, ``"models/"``, ``"source.txt:renamed.txt"`` and
    ``"raw_data/:processed_data/"``; anything else raises :class:`ManifestError` naming
    the entry and how to write it. ``None`` (the field is absent) means no rules.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ManifestError(
            f"files_to_stage must be a list of strings, got {type(raw).__name__}; "
            'write it like ["data.csv", "models/", "source.txt:renamed.txt"].'
        )
    return [_parse_rule(entry) for entry in raw]


def _parse_rule(entry: object) -> StageRule:
    if not isinstance(entry, str):
        raise ManifestError(
            f"files_to_stage entries must be strings, got {type(entry).__name__} {entry!r}; "
            'write a file as "data.csv" or a folder as "models/".'
        )
    if not entry.strip():
        raise ManifestError(
            "files_to_stage has an empty entry; remove it or name a file of the app."
        )
    if "\0" in entry:
        raise ManifestError(f"files_to_stage entry {entry!r} contains a NUL character.")
    if "\\" in entry:
        raise ManifestError(
            f"files_to_stage entry {entry!r} contains a backslash; "
            "separate folders with '/' (e.g. 'models/weights.bin')."
        )
    if entry.count(":") > 1:
        raise ManifestError(
            f"files_to_stage entry {entry!r} has more than one ':'; use 'source:target' "
            "with a single ':' to rename, or no ':' to keep the name."
        )
    source, _, target = entry.partition(":")
    if ":" in entry and (not source or not target):
        raise ManifestError(
            f"files_to_stage entry {entry!r} renames but one side of ':' is empty; "
            "write it as 'source.txt:target.txt' or 'source/:target/'."
        )
    target = target or source
    is_dir = source.endswith("/")
    if target.endswith("/") != is_dir:
        kind = ("folder", "file") if is_dir else ("file", "folder")
        raise ManifestError(
            f"files_to_stage entry {entry!r} renames a {kind[0]} to a {kind[1]}; end both "
            "sides with '/' for a folder ('raw/:processed/') or neither for a file "
            "('a.txt:b.txt')."
        )
    return StageRule(
        source=_relative_path(source, entry, "source"),
        target=_relative_path(target, entry, "target"),
        is_dir=is_dir,
    )


def _relative_path(path: str, entry: str, side: str) -> str:
    """A plain relative POSIX path (one trailing '/' allowed for folders) or an error."""
    if path.startswith("/"):
        raise ManifestError(
            f"files_to_stage entry {entry!r}: the {side} '{path}' is absolute; paths are "
            "relative to the app's files (source) and the session folder (target), so "
            "drop the leading '/'."
        )
    body = path[:-1] if path.endswith("/") else path
    segments = body.split("/")
    if ".." in segments:
        raise ManifestError(
            f"files_to_stage entry {entry!r}: '..' is not allowed in the {side}; "
            "staged files stay inside the session folder."
        )
    if any(segment in ("", ".") for segment in segments):
        raise ManifestError(
            f"files_to_stage entry {entry!r}: the {side} '{path}' has an empty or '.' "
            "part; write a plain relative path such as 'data/train.csv' or 'models/'."
        )
    return body
