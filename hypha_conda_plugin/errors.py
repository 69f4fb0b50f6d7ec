"""Exception types the worker raises to its callers.

Each message is written for the person who called the service: what went wrong and what
to change. They cross the Hypha RPC boundary as text, so the text is what matters.
"""

from __future__ import annotations


class CondaWorkerError(Exception):
    """Base class of every error the worker reports to callers."""


class ManifestError(CondaWorkerError):
    """The manifest (dependencies, channels, entry point, ...) is malformed."""


class EnvironmentBuildError(CondaWorkerError):
    """The conda environment could not be solved or installed."""


class SessionNotFoundError(CondaWorkerError):
    """No session with that id exists for the caller."""


class SessionExistsError(CondaWorkerError):
    """A session with that id is already running for the caller."""


class SessionStateError(CondaWorkerError):
    """The session exists but cannot do what was asked in its current state."""


class AppFileError(CondaWorkerError):
    """A file of the app (its entry point) could not be read from the server."""


class WorkspaceNotAuthorizedError(CondaWorkerError):
    """The caller's workspace may not use this worker."""


class StagingError(CondaWorkerError):
    """A files_to_stage file or folder could not be copied into the session folder."""


class InvalidTokenError(WorkspaceNotAuthorizedError):
    """A token the worker needed to name the caller's workspace was missing or refused."""
