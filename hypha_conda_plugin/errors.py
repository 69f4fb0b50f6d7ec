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


class PackageManagerError(EnvironmentBuildError):
    """The package manager itself failed (crashed, broken, not executable), not the
    request: the worker tries the next package manager in its order."""


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


class AnonymousCallerError(WorkspaceNotAuthorizedError):
    """An anonymous visitor called a worker that only serves signed-in users."""


class SandboxUnavailableError(CondaWorkerError):
    """The kernel sandbox is required (CONDA_SANDBOX=bwrap) but cannot run on this host."""


class QuotaExceededError(CondaWorkerError):
    """A limit of the worker (sessions, builds) was reached; the message names the setting."""


class ConfigError(CondaWorkerError):
    """A field of a call's config is malformed or not the caller's to set."""


class InvalidArgumentError(CondaWorkerError):
    """A number (or other scalar) a caller passed is of the wrong type or out of range."""


class InvalidTokenError(WorkspaceNotAuthorizedError):
    """A token the worker needed to name the caller's workspace was missing or refused."""
