"""A ``start`` config, checked: who the session belongs to and what it may name.

Everything a caller puts in ``start``'s config is validated here, once, before any work:
the manifest, the session id, the app whose files are read and from where. The rules
depend on who calls:

- The server itself (Hypha's app controller, user ``root``) starts apps on behalf of a
  workspace (which the worker has checked against the app's token before this), with a
  ``workspace/client_id`` session id.
- Anyone else starts sessions in their own workspace only, and may not set the
  app-files URL or the server URL at all (a clear error).

Either way the app's files are read from the worker's own server, under the session's
workspace, with the token in the config (the app's, or the caller's own): the worker
never fetches from a URL a config names. Even the app controller's config is not
trusted for that: Hypha merges the starter's ``additional_kwargs`` into it, so its
``app_files_base_url`` and ``server_url`` could be anyone's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from hypha_conda_plugin import validation
from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import ConfigError, ManifestError
from hypha_conda_plugin.settings import SUPPORTED_APP_TYPE, Settings
from hypha_conda_plugin.stage_rules import StageRule, parse_stage_rules

MAX_SESSION_ID_LENGTH = 256
#: Config keys only the server's own app controller may set.
SERVER_ONLY_KEYS = ("app_files_base_url", "server_url")


@dataclass(frozen=True)
class StartRequest:
    session_id: str
    workspace: str
    app_id: str | None
    spec: EnvSpec
    stage_rules: list[StageRule]
    app_files: AppFiles | None
    entry_point: str | None
    entry_timeout: float | None
    app_env: dict[str, str]
    progress_callback: Callable[[dict[str, Any]], Any] | None
    config: Mapping[str, Any]
    manifest: Mapping[str, Any]

    def reading(self, app_files: AppFiles) -> StartRequest:
        """The same start, reading the app's files as ``app_files`` says (its version)."""
        return replace(self, app_files=app_files)

    @classmethod
    def parse(
        cls,
        config: object,
        *,
        workspace: str,
        from_server: bool,
        server_url: str | None,
        settings: Settings,
    ) -> StartRequest:
        """Validate ``config`` for a session of ``workspace`` (``from_server``: the app
        controller, acting for that workspace)."""
        config = dict(validation.options(config, "start()'s config"))
        manifest = config.get("manifest")
        if not isinstance(manifest, Mapping):
            raise ManifestError(
                "start() needs config['manifest'], a mapping with "
                "'dependencies' and optionally 'channels'."
            )
        app_type = manifest.get("type")
        if app_type not in (None, SUPPORTED_APP_TYPE):
            raise ManifestError(
                f"This worker runs apps of type '{SUPPORTED_APP_TYPE}', not '{app_type}'."
            )
        if from_server:
            config = {k: v for k, v in config.items() if k not in SERVER_ONLY_KEYS}
        else:
            _refuse_server_only_keys(config, workspace)
        config = _own_app(config, workspace)
        session_id = _session_id(config.get("id"), workspace, from_server)
        app_files = AppFiles.for_start(config, server_url)
        spec = EnvSpec.from_manifest(
            manifest, default_channels=settings.default_channels, for_app=app_files is not None
        )
        stage_rules = parse_stage_rules(manifest.get("files_to_stage"))
        if stage_rules and app_files is None:
            raise ManifestError(
                "files_to_stage needs an app's files, but this start names no app "
                "(app_id or artifact_id). Install the app and start it through the app "
                "controller, or remove files_to_stage from the manifest."
            )
        app_env = {
            "HYPHA_SERVER_URL": server_url,
            "HYPHA_WORKSPACE": workspace,
            "HYPHA_CLIENT_ID": config.get("client_id"),
            "HYPHA_TOKEN": config.get("token"),
            "HYPHA_APP_ID": config.get("app_id"),
        }
        return cls(
            session_id=session_id,
            workspace=workspace,
            app_id=_optional_str(config.get("app_id"), "app_id"),
            spec=spec,
            stage_rules=stage_rules,
            app_files=app_files,
            entry_point=_optional_str(
                config.get("entry_point") or manifest.get("entry_point"), "entry_point"
            ),
            entry_timeout=validation.optional_time_limit(
                config.get("timeout"), "config['timeout']", settings.kernel_start_timeout
            ),
            app_env={key: str(value) for key, value in app_env.items() if value},
            progress_callback=validation.callback(
                config.get("progress_callback"), "config['progress_callback']"
            ),
            config=config,
            manifest=manifest,
        )


def _refuse_server_only_keys(config: Mapping[str, Any], workspace: str) -> None:
    named = [key for key in SERVER_ONLY_KEYS if config.get(key)]
    if named:
        raise ConfigError(
            f"config {named} may only be set by the Hypha server's app controller. To run an "
            "app of your workspace, pass its 'app_id' (or 'artifact_id'); the worker reads "
            "its files from its own server."
        )
    claimed = config.get("workspace")
    if claimed and claimed != workspace:
        raise ConfigError(
            f"config['workspace'] is '{claimed}', but you call from workspace '{workspace}'; "
            "sessions always belong to the caller's workspace. Leave 'workspace' out."
        )


def _own_app(config: dict[str, Any], workspace: str) -> dict[str, Any]:
    """The config with its app (if any) named as ``workspace/alias`` in the session's own
    workspace: an app of another workspace is refused."""
    artifact = config.get("artifact_id") or config.get("app_id")
    if artifact:
        artifact = _optional_str(artifact, "artifact_id")
        owner, _, alias = artifact.rpartition("/")
        if owner and owner != workspace:
            raise ConfigError(
                f"artifact_id '{artifact}' belongs to workspace '{owner}'; a session may only "
                f"read apps of its own workspace '{workspace}'."
            )
        if not alias or "/" in alias:
            raise ConfigError(f"artifact_id '{artifact}' is not 'workspace/alias' or 'alias'.")
        config = {**config, "artifact_id": f"{workspace}/{alias}"}
    return {**config, "workspace": workspace}


def _session_id(raw: object, workspace: str, from_server: bool) -> str:
    if raw is None or raw == "":
        return uuid.uuid4().hex
    if not isinstance(raw, str) or len(raw) > MAX_SESSION_ID_LENGTH or "\0" in raw:
        raise ConfigError(
            f"config['id'] must be a string of at most {MAX_SESSION_ID_LENGTH} characters."
        )
    if "/" in raw:
        owner = raw.split("/", 1)[0]
        if not from_server:
            raise ConfigError(
                f"config['id'] '{raw}' contains '/', which is reserved for the server's own "
                "'workspace/client' ids; choose an id without '/'."
            )
        if owner != workspace:
            raise ConfigError(
                f"Session id '{raw}' names workspace '{owner}' but the start is for '{workspace}'."
            )
    return raw


def _optional_str(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\0" in value:
        raise ConfigError(f"config['{field}'] must be a string, got {value!r}.")
    return value
