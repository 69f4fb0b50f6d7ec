"""The one settings object of the worker.

Every option is read here and only here: from ``CONDA_*`` variables when the worker runs
inside a Hypha server (startup function), from CLI flags and ``HYPHA_*`` variables when it
runs standalone. Other modules receive a ``Settings`` instance and never read the
environment themselves, so a test or an embedding application can build one directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hypha_conda_plugin.outputs import DEFAULT_MAX_OUTPUT_BYTES
from hypha_conda_plugin.sessions import DEFAULT_MAX_LOG_BYTES
from hypha_conda_plugin.validation import MAX_TIME_LIMIT

DEFAULT_CACHE_DIR = Path("~/.hypha_conda_cache")
SUPPORTED_APP_TYPE = "conda-jupyter-kernel"
PackageManagerChoice = Literal["auto", "mamba", "micromamba", "conda", "rattler"]


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def _split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _default_working_dir() -> Path:
    # Stable per user (not random per process): a worker that restarts after a crash
    # finds, and sweeps, what the dead run left (see instances.py).
    return Path("/tmp") / f"hypha_conda_sessions_{os.getuid()}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: object) -> int | None:
    """Bytes from ``2G``, ``512M``, ``1.5GiB``, ``10000`` (K/M/G/T are powers of 1024, as
    in Docker and Kubernetes' ``Gi``); ``none``, ``0`` or empty mean no limit."""
    if value is None or isinstance(value, bool):
        return None if value is None else _size_error(value)
    if isinstance(value, int | float):
        return int(value) or None
    text = str(value).strip()
    if text.lower() in ("", "none", "off", "0"):
        return None
    match = _SIZE.match(text)
    if not match:
        return _size_error(value)
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgtp".index(unit or " ")) or None


def _size_error(value: object) -> int:
    raise ValueError(f"{value!r} is not a size; write it like 2G, 512M or 1.5GiB")


class Settings(BaseModel):
    """Everything the worker can be configured with, with the defaults users expect."""

    model_config = ConfigDict(frozen=True, validate_default=True)

    # Where and how the worker registers itself.
    server_url: str | None = None
    workspace: str | None = None
    token: str | None = None
    service_id: str = "conda-worker"
    visibility: Literal["public", "protected"] = "protected"
    authorized_workspaces: tuple[str, ...] = ()

    # Where sessions and environments live.
    working_dir: Path = Field(default_factory=_default_working_dir)
    cache_dir: Path = DEFAULT_CACHE_DIR

    # How many environments the cache keeps (see envs/eviction.py).
    max_concurrent_builds: int = Field(default=2, ge=1, le=64)
    cache_max_envs: int = Field(default=10, ge=1)
    cache_max_age_days: float = Field(default=30.0, gt=0)
    cache_max_size: int | None = Field(default=None, gt=0)
    cache_sweep_interval: float = Field(default=3600.0, gt=0, le=86400 * 7)

    # How environments are built.
    channel_alias: str | None = None
    default_channels: tuple[str, ...] = ("conda-forge",)
    build_timeout: float = Field(default=1800.0, gt=0, allow_inf_nan=False)
    # Which tool builds environments, and where ``auto`` looks for mamba and conda: the
    # PATH and the CONDA_EXE / MAMBA_EXE the worker was started with (conda's and
    # mamba's shell activation set those two). None means "not given": nothing found.
    package_manager: PackageManagerChoice = "auto"
    tool_search_path: str | None = None
    conda_exe: str | None = None
    mamba_exe: str | None = None

    # How kernels run.
    kernel_start_timeout: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    sandbox: Literal["auto", "bwrap", "off"] = "auto"
    # Address space of each kernel process (RLIMIT_AS): Python raises MemoryError past it.
    session_memory_limit: int | None = 8 * 1024**3
    kernel_pool_size: int = Field(default=2, ge=0, le=64)
    kernel_pool_idle: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    default_execute_timeout: float | None = Field(
        default=None, gt=0, le=MAX_TIME_LIMIT, allow_inf_nan=False
    )

    # What one worker holds at most (a shared server's defaults).
    max_sessions: int = Field(default=50, ge=1)
    max_sessions_per_workspace: int = Field(default=10, ge=1)
    idle_timeout: float | None = Field(default=3600.0, gt=0, allow_inf_nan=False)
    # What a caller can make the worker hold: a cell's output (as text in its result)
    # and a session's log.
    max_output_bytes: int = Field(default=DEFAULT_MAX_OUTPUT_BYTES, ge=1024)
    max_log_entries: int = Field(default=10_000, ge=100)
    max_log_bytes: int = Field(default=DEFAULT_MAX_LOG_BYTES, ge=64 * 1024)

    # Who may call.
    allow_anonymous: bool = False

    # What one start may copy from an app's files (files_to_stage, entry point). Every
    # caller may be hostile and the session folders share the worker's disk.
    max_staged_files: int = Field(default=10_000, ge=1)
    max_staged_bytes: int = Field(default=2 * 1024**3, ge=1)
    max_entry_point_bytes: int = Field(default=1024**2, ge=1)

    verbose: bool = False

    @field_validator("idle_timeout", mode="before")
    @classmethod
    def _optional_seconds(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "0", "none", "off"):
            return None
        return None if value == 0 else value

    @field_validator("session_memory_limit", "cache_max_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> int | None:
        return parse_size(value)

    @field_validator("working_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Absolute, resolved paths: environments are not relocatable (the prefix is
        # written into shebangs), and every containment check compares resolved paths.
        return value.expanduser().resolve()

    @field_validator("package_manager", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("channel_alias")
    @classmethod
    def _alias_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if "://" not in value:
            # A plain folder path is accepted for convenience.
            value = Path(value).expanduser().resolve().as_uri()
        return value.rstrip("/") + "/"

    @property
    def envs_dir(self) -> Path:
        return self.cache_dir / "envs"

    @property
    def pkgs_dir(self) -> Path:
        return self.cache_dir / "pkgs"

    @classmethod
    def for_cache_tool(
        cls, cache_dir: str | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings for ``envs list|prune``: the worker's cache folder, found the way the
        worker finds it (``--cache-dir``, then ``HYPHA_CACHE_DIR``, then the ``CONDA_*``
        variables)."""
        env = os.environ if environ is None else environ
        chosen = cache_dir or env.get("HYPHA_CACHE_DIR")
        return cls.from_env(env, **({"cache_dir": chosen} if chosen else {}))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings for the in-server worker, from ``CONDA_*`` variables.

        The startup function registers in the ``public`` workspace, so the service is
        public unless ``CONDA_VISIBILITY`` says otherwise.
        """
        env = os.environ if environ is None else environ
        values: dict[str, object] = {
            "service_id": env.get("CONDA_SERVICE_ID") or "conda-worker",
            "visibility": env.get("CONDA_VISIBILITY") or "public",
            "authorized_workspaces": tuple(_split_list(env.get("CONDA_AUTHORIZED_WORKSPACES"))),
        }
        optional = {
            "working_dir": "CONDA_WORKING_DIR",
            "cache_dir": "CONDA_CACHE_DIR",
            "channel_alias": "CONDA_CHANNEL_ALIAS",
            "build_timeout": "CONDA_BUILD_TIMEOUT",
            "kernel_start_timeout": "CONDA_KERNEL_START_TIMEOUT",
            "default_execute_timeout": "CONDA_EXECUTE_TIMEOUT",
            "max_output_bytes": "CONDA_MAX_OUTPUT_BYTES",
            "max_log_entries": "CONDA_MAX_LOG_ENTRIES",
            "sandbox": "CONDA_SANDBOX",
            "session_memory_limit": "CONDA_SESSION_MEMORY_LIMIT",
            "allow_anonymous": "CONDA_ALLOW_ANONYMOUS",
            "kernel_pool_size": "CONDA_KERNEL_POOL_SIZE",
            "kernel_pool_idle": "CONDA_KERNEL_POOL_IDLE",
            "max_sessions": "CONDA_MAX_SESSIONS",
            "max_sessions_per_workspace": "CONDA_MAX_SESSIONS_PER_WORKSPACE",
            "idle_timeout": "CONDA_IDLE_TIMEOUT",
            "max_log_bytes": "CONDA_MAX_LOG_BYTES",
            "package_manager": "CONDA_PACKAGE_MANAGER",
            "tool_search_path": "PATH",
            "conda_exe": "CONDA_EXE",
            "mamba_exe": "MAMBA_EXE",
            "max_concurrent_builds": "CONDA_MAX_CONCURRENT_BUILDS",
            "cache_max_envs": "CONDA_CACHE_MAX_ENVS",
            "cache_max_age_days": "CONDA_CACHE_MAX_AGE_DAYS",
            "cache_max_size": "CONDA_CACHE_MAX_SIZE",
            "cache_sweep_interval": "CONDA_CACHE_SWEEP_INTERVAL",
            "max_staged_files": "CONDA_MAX_STAGED_FILES",
            "max_staged_bytes": "CONDA_MAX_STAGED_BYTES",
            "max_entry_point_bytes": "CONDA_MAX_ENTRY_POINT_BYTES",
        }
        for field, variable in optional.items():
            if env.get(variable):
                values[field] = env[variable]
        if env.get("CONDA_DEFAULT_CHANNELS"):
            values["default_channels"] = tuple(_split_list(env["CONDA_DEFAULT_CHANNELS"]))
        values.update(overrides)
        return cls._validated(values)

    @classmethod
    def from_cli(
        cls, args: Mapping[str, object], environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings for the standalone worker: CLI flags win over ``HYPHA_*`` variables.

        ``CONDA_CHANNEL_ALIAS`` and the other ``CONDA_*`` build options apply here too, so
        one variable points both kinds of worker at a mirror.
        """
        env = os.environ if environ is None else environ
        base = cls.from_env(env, visibility="protected").model_dump()
        base["service_id"] = env.get("HYPHA_SERVICE_ID") or "conda-worker"
        mapping = {
            "server_url": "HYPHA_SERVER_URL",
            "workspace": "HYPHA_WORKSPACE",
            "token": "HYPHA_TOKEN",
            "visibility": "HYPHA_VISIBILITY",
            "cache_dir": "HYPHA_CACHE_DIR",
            "working_dir": "HYPHA_WORKING_DIR",
            "authorized_workspaces": "HYPHA_AUTHORIZED_WORKSPACES",
        }
        for field, variable in mapping.items():
            value = args.get(field)
            if value in (None, ""):
                value = env.get(variable) or None
            if value is None:
                continue
            if field == "authorized_workspaces" and isinstance(value, str):
                value = tuple(_split_list(value))
            base[field] = value
        if args.get("service_id"):
            base["service_id"] = args["service_id"]
        if args.get("package_manager"):
            base["package_manager"] = args["package_manager"]
        base["verbose"] = bool(args.get("verbose"))
        settings = cls._validated(base)
        missing = [
            f"--{name.replace('_', '-')} (or {variable})"
            for name, variable in mapping.items()
            if name in ("server_url", "workspace", "token") and not getattr(settings, name)
        ]
        if missing:
            raise SettingsError(
                "The standalone worker needs " + ", ".join(missing) + ". Pass the flag or set "
                "the variable; a token comes from the Hypha web UI or `generate_token`."
            )
        return settings

    @classmethod
    def _validated(cls, values: Mapping[str, object]) -> Settings:
        try:
            return cls.model_validate(dict(values))
        except ValueError as error:
            raise SettingsError(f"Invalid worker setting: {error}") from error
