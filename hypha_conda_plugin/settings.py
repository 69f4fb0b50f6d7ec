"""The one settings object of the worker.

Every option is read here and only here: from ``CONDA_*`` variables when the worker runs
inside a Hypha server (startup function), from CLI flags and ``HYPHA_*`` variables when it
runs standalone. Other modules receive a ``Settings`` instance and never read the
environment themselves, so a test or an embedding application can build one directly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CACHE_DIR = Path("~/.hypha_conda_cache")
SUPPORTED_APP_TYPE = "conda-jupyter-kernel"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which and how to fix it."""


def _split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _default_working_dir() -> Path:
    return Path("/tmp") / f"hypha_sessions_{uuid.uuid4().hex[:8]}"


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

    # How environments are built.
    channel_alias: str | None = None
    default_channels: tuple[str, ...] = ("conda-forge",)
    build_timeout: float = Field(default=1800.0, gt=0)

    # How kernels run.
    kernel_start_timeout: float = Field(default=120.0, gt=0)
    default_execute_timeout: float | None = Field(default=None, gt=0)
    max_log_entries: int = Field(default=10_000, ge=100)

    # What one start may copy from an app's files (files_to_stage, entry point). Every
    # caller may be hostile and the session folders share the worker's disk.
    max_staged_files: int = Field(default=10_000, ge=1)
    max_staged_bytes: int = Field(default=2 * 1024**3, ge=1)
    max_entry_point_bytes: int = Field(default=1024**2, ge=1)

    verbose: bool = False

    @field_validator("working_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Absolute, resolved paths: environments are not relocatable (the prefix is
        # written into shebangs), and every containment check compares resolved paths.
        return value.expanduser().resolve()

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
            "max_log_entries": "CONDA_MAX_LOG_ENTRIES",
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
