"""How much one start may stage: files, bytes, and the listings that find them.

A manifest's ``files_to_stage`` and the artifact behind it are chosen by the caller, and
session folders share the worker's disk (inside a Hypha server, the server's disk). So a
start may list, count and write only so much; going over a limit is a
:class:`StagingError` that names the limit, its setting and the numbers, raised before
anything is written when the sizes are known up front and as soon as a byte too many
arrives when they are not.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from hypha_conda_plugin.errors import StagingError
from hypha_conda_plugin.settings import Settings

#: Listings may also name folders; a tree of N files has fewer than N folders (an
#: artifact's folders are key prefixes, never empty), so twice the file limit is enough.
LISTING_ENTRIES_PER_FILE = 2

_RAISE_HINT = "Stage fewer or smaller files, or ask the worker's operator to raise {setting}."


@dataclass(frozen=True)
class StagingLimits:
    """The bounds of one start (``Settings.max_staged_files`` and ``max_staged_bytes``)."""

    max_files: int = 10_000
    max_bytes: int = 2 * 1024**3

    @classmethod
    def from_settings(cls, settings: Settings) -> StagingLimits:
        return cls(max_files=settings.max_staged_files, max_bytes=settings.max_staged_bytes)

    @property
    def max_listing_entries(self) -> int:
        """Entries (files and folders) all listings of one start may return together;
        this also bounds the listing requests, since every page but a folder's last is
        full."""
        return self.max_files * LISTING_ENTRIES_PER_FILE

    def check_files(self, count: int, where: str, *, at_least: bool = False) -> None:
        if count > self.max_files:
            raise StagingError(
                f"files_to_stage names {'at least ' if at_least else ''}{count} files{where}; "
                f"a start may stage at most "
                f"{self.max_files} (CONDA_MAX_STAGED_FILES={self.max_files}). "
                + _RAISE_HINT.format(setting="CONDA_MAX_STAGED_FILES")
            )

    def check_listing(self, entries: int, folder: str) -> None:
        if entries > self.max_listing_entries:
            raise StagingError(
                f"Listing the app's folders for files_to_stage returned more than "
                f"{self.max_listing_entries} entries (stopped at '{folder}/' with {entries}); "
                f"listings may return at most {LISTING_ENTRIES_PER_FILE} x "
                f"CONDA_MAX_STAGED_FILES={self.max_files} entries. "
                + _RAISE_HINT.format(setting="CONDA_MAX_STAGED_FILES")
            )

    def bytes_error(self, size: int, what: str, *, at_least: bool = False) -> StagingError:
        return StagingError(
            f"files_to_stage would write {'at least ' if at_least else ''}{size} bytes"
            f"{what}; a start may stage at most {self.max_bytes} bytes "
            f"(CONDA_MAX_STAGED_BYTES={self.max_bytes}). "
            + _RAISE_HINT.format(setting="CONDA_MAX_STAGED_BYTES")
        )


@dataclass
class ByteBudget:
    """Bytes written so far in one start, shared by the event loop and writer threads."""

    limits: StagingLimits
    used: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def remaining(self) -> int:
        return max(0, self.limits.max_bytes - self.used)

    def add(self, size: int, what: str) -> None:
        """Count ``size`` more bytes, or raise the bound's error (counting nothing)."""
        with self._lock:
            if self.used + size > self.limits.max_bytes:
                raise self.limits.bytes_error(self.used + size, what, at_least=True)
            self.used += size

    def check_more(self, size: int, what: str) -> None:
        """Raise the bound's error now if ``size`` more bytes would not fit."""
        with self._lock:
            if self.used + size > self.limits.max_bytes:
                raise self.limits.bytes_error(self.used + size, what)
