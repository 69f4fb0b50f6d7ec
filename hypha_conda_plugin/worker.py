"""CondaWorker: the service Hypha clients and the app controller call.

This layer owns the RPC surface only: it works out who is calling, checks they may,
validates input, and hands the work to the environment cache, the session registry and
the kernel. Every method is async and leaves the event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hypha_conda_plugin import __version__
from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.callbacks import notify
from hypha_conda_plugin.childenv import clean_env
from hypha_conda_plugin.envs.builders import RattlerBuilder
from hypha_conda_plugin.envs.cache import EnvCache
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import (
    AppFileError,
    CondaWorkerError,
    ManifestError,
    SessionStateError,
    WorkspaceNotAuthorizedError,
)
from hypha_conda_plugin.kernel import Kernel
from hypha_conda_plugin.sessions import LOG_TYPES, Session, SessionManager, SessionState
from hypha_conda_plugin.settings import SUPPORTED_APP_TYPE, Settings
from hypha_conda_plugin.stage_rules import parse_stage_rules
from hypha_conda_plugin.staging import stage_files
from hypha_conda_plugin.staging_limits import StagingLimits

logger = logging.getLogger(__name__)

MAX_SESSION_ID_LENGTH = 256


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the context Hypha attaches to each call."""

    workspace: str
    user_id: str | None

    @property
    def is_root(self) -> bool:
        return self.user_id == "root"

    @classmethod
    def from_context(cls, context: Mapping[str, Any] | None) -> Caller:
        if not context:
            # Only an in-process call without Hypha in between has no context.
            return cls(workspace="local", user_id="root")
        user = context.get("user") or {}
        return cls(workspace=str(context.get("ws") or ""), user_id=user.get("id"))


class CondaWorker:
    """Runs Jupyter kernels in conda environments for Hypha callers."""

    def __init__(
        self, settings: Settings, *, server_url: str | None = None, in_server: bool = False
    ) -> None:
        """``in_server``: running inside the Hypha server (startup function), so the app
        controller should hand us its local URLs rather than public ones."""
        self.settings = settings
        self.server_url = server_url or settings.server_url
        self.in_server = in_server
        builder = RattlerBuilder(
            pkgs_dir=settings.pkgs_dir,
            repodata_cache_dir=settings.cache_dir / "repodata",
            channel_alias=settings.channel_alias,
            timeout=settings.build_timeout,
        )
        self.envs = EnvCache(
            settings.envs_dir,
            builder,
            channel_alias=settings.channel_alias,
            platform=_platform(),
            pip_timeout=settings.build_timeout,
        )
        self.sessions = SessionManager(settings.working_dir, settings.max_log_entries)

    # ----------------------------------------------------------------- registration
    def service_definition(self) -> dict[str, Any]:
        """The Hypha service: a server-app-worker for conda-jupyter-kernel apps."""
        config: dict[str, Any] = {"visibility": self.settings.visibility, "require_context": True}
        if self.settings.authorized_workspaces:
            config["authorized_workspaces"] = list(self.settings.authorized_workspaces)
        return {
            "id": self.settings.service_id,
            "name": "Conda Environment Worker",
            "description": "Runs Python code in Jupyter kernels inside isolated conda "
            f"environments (hypha-conda-plugin {__version__}).",
            "type": "server-app-worker",
            "config": config,
            "supported_types": [SUPPORTED_APP_TYPE],
            "use_local_url": self.in_server,
            "start": self.start,
            "stop": self.stop,
            "execute": self.execute,
            "get_logs": self.get_logs,
            "interrupt": self.interrupt,
            "restart": self.restart,
            "list_sessions": self.list_sessions,
            "get_session_info": self.get_session_info,
            "compile": self.compile,
            "shutdown": self.shutdown,
        }

    # ----------------------------------------------------------------- public methods
    async def start(self, config: dict[str, Any], context: dict | None = None) -> str:
        """Build or reuse the environment, start a kernel, run the app's entry point."""
        caller = self._authorize(context)
        config = dict(config or {})
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
        session_id = _session_id(config.get("id"))
        workspace = self._owner(caller, config)
        app_files = AppFiles.for_start(config, self.server_url)
        spec = EnvSpec.from_manifest(
            manifest, default_channels=self.settings.default_channels, for_app=app_files is not None
        )
        stage_rules = parse_stage_rules(manifest.get("files_to_stage"))
        if stage_rules and app_files is None:
            raise ManifestError(
                "files_to_stage needs an app's files, but this start names no app "
                "(app_id, artifact_id or app_files_base_url). Install the app and start it "
                "through the app controller, or remove files_to_stage from the manifest."
            )
        session = self.sessions.create(workspace, session_id, config.get("app_id"))
        session.start_task = asyncio.current_task()
        callback = config.get("progress_callback")

        async def progress(message: dict[str, Any]) -> None:
            session.log.add("progress", message.get("message", ""))
            await notify(callback, message)

        try:
            await progress(
                {"type": "info", "stage": "start", "message": f"Starting session {session_id}"}
            )
            session.env = await self.envs.acquire(spec, progress)
            await asyncio.to_thread(session.workdir.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(session.runtime_dir.mkdir, parents=True, exist_ok=True)
            if stage_rules:
                await stage_files(
                    stage_rules,
                    dest=session.workdir,
                    files=app_files,
                    progress=progress,
                    limits=StagingLimits.from_settings(self.settings),
                )
            entry_point = config.get("entry_point") or manifest.get("entry_point")
            entry_code = await self._entry_point(entry_point, app_files, progress, session)
            await progress({"type": "info", "stage": "kernel", "message": "Starting kernel"})
            session.kernel = Kernel(
                session.env.python,
                cwd=session.workdir,
                env=clean_env(session.env.prefix, extra=self._app_env(config, workspace)),
                log_path=session.runtime_dir / "kernel.log",
            )
            await session.kernel.start(timeout=self.settings.kernel_start_timeout)
            if entry_code is not None:
                await self._run_entry_point(session, entry_point, entry_code, config, progress)
        except BaseException as error:
            if session.state == SessionState.STOPPING:
                # stop() cancelled us; it releases the session itself.
                raise SessionStateError(
                    f"Session '{session_id}' was stopped while starting."
                ) from error
            session.state = SessionState.FAILED
            session.error = str(error) or type(error).__name__
            session.log.add("error", f"Start failed: {error}")
            await notify(
                callback,
                {"type": "error", "stage": "start", "message": f"Failed to start session: {error}"},
            )
            session.start_task = None
            await asyncio.shield(self._release(session, keep_record=True))
            raise
        session.start_task = None
        session.state = SessionState.READY
        await progress(
            {
                "type": "success",
                "stage": "ready",
                "progress": 1.0,
                "message": f"Session {session_id} is ready",
            }
        )
        return session_id

    async def execute(
        self,
        session_id: str,
        script: str,
        config: dict | None = None,
        progress_callback: Callable | None = None,
        output_callback: Callable | None = None,
        context: dict | None = None,
    ) -> dict[str, Any]:
        """Run one cell and return its outputs in Jupyter's shape."""
        session = self._session(session_id, context)
        if not isinstance(script, str):
            raise CondaWorkerError("execute() needs the code as a string in 'script'.")
        kernel = self._live_kernel(session)
        timeout = _execute_timeout(config, self.settings.default_execute_timeout)
        await notify(
            progress_callback, {"type": "info", "stage": "execute", "message": "Executing code"}
        )

        async def on_output(item: dict[str, Any]) -> None:
            session.record_output(item)
            await notify(output_callback, item)

        session.running += 1
        session.state = SessionState.BUSY
        try:
            result = await kernel.execute(script, timeout=timeout, output_callback=on_output)
        finally:
            session.running -= 1
            if session.state == SessionState.BUSY and session.running == 0:
                session.state = SessionState.READY
        session.executions += 1
        if result.get("status") == "error" and result.get("error"):
            error = result["error"]
            session.log.add("error", f"{error.get('ename')}: {error.get('evalue')}")
        await notify(
            progress_callback,
            {
                "type": "success" if result.get("status") == "ok" else "error",
                "stage": "execute",
                "message": f"Execution finished: {result.get('status')}",
            },
        )
        return result

    async def stop(self, session_id: str, context: dict | None = None) -> None:
        """Shut the kernel down and delete the session's folder."""
        await self._stop_session(self._session(session_id, context))

    async def get_logs(
        self,
        session_id: str,
        type: str | None = None,
        offset: int = 0,
        limit: int | None = None,
        context: dict | None = None,
    ) -> dict[str, Any]:
        session = self._session(session_id, context)
        if type is not None and type not in LOG_TYPES:
            raise CondaWorkerError(f"Unknown log type '{type}'; use one of {list(LOG_TYPES)}.")
        return session.log.query(type, offset, limit)

    async def interrupt(self, session_id: str, context: dict | None = None) -> None:
        await self._live_kernel(self._session(session_id, context)).interrupt()

    async def restart(self, session_id: str, context: dict | None = None) -> None:
        session = self._session(session_id, context)
        await self._live_kernel(session).restart(timeout=self.settings.kernel_start_timeout)
        session.log.add("info", "Kernel restarted")

    async def list_sessions(self, context: dict | None = None) -> list[dict[str, Any]]:
        caller = self._authorize(context)
        return [s.info() for s in self.sessions.list(None if caller.is_root else caller.workspace)]

    async def get_session_info(self, session_id: str, context: dict | None = None) -> dict:
        return self._session(session_id, context).info()

    async def compile(
        self, manifest: dict, files: list, config: dict | None = None, context: dict | None = None
    ) -> tuple[dict, list]:
        """Validate a manifest when an app is installed, so errors surface early."""
        EnvSpec.from_manifest(manifest, default_channels=self.settings.default_channels)
        parse_stage_rules(manifest.get("files_to_stage"))
        manifest = dict(manifest)
        manifest.setdefault("entry_point", "main.py")
        return manifest, files

    async def shutdown(self, context: dict | None = None) -> None:
        """Stop every session (worker going away)."""
        if context is not None and not Caller.from_context(context).is_root:
            raise WorkspaceNotAuthorizedError("Only the server may shut the worker down.")
        await asyncio.gather(
            *(self._stop_session(s) for s in self.sessions.list()), return_exceptions=True
        )

    # ----------------------------------------------------------------- helpers
    def _authorize(self, context: Mapping[str, Any] | None) -> Caller:
        caller = Caller.from_context(context)
        allowed = self.settings.authorized_workspaces
        if allowed and not caller.is_root and caller.workspace not in allowed:
            raise WorkspaceNotAuthorizedError(
                f"Workspace '{caller.workspace}' may not use this worker; ask its operator to "
                "add it to CONDA_AUTHORIZED_WORKSPACES."
            )
        return caller

    @staticmethod
    def _owner(caller: Caller, config: Mapping[str, Any]) -> str:
        """The workspace a new session belongs to: the caller's, or for the server's own
        app controller (root), the app's workspace it names."""
        if caller.is_root and config.get("workspace"):
            return str(config["workspace"])
        return caller.workspace

    def _session(self, session_id: str, context: Mapping[str, Any] | None) -> Session:
        caller = self._authorize(context)
        if not isinstance(session_id, str) or not session_id:
            raise CondaWorkerError("A session id (the string start() returned) is required.")
        try:
            return self.sessions.get(caller.workspace, session_id)
        except CondaWorkerError:
            if caller.is_root:
                return self.sessions.find_any(session_id)
            raise

    @staticmethod
    def _live_kernel(session: Session) -> Kernel:
        if session.kernel is None or session.state not in (SessionState.READY, SessionState.BUSY):
            raise SessionStateError(
                f"Session '{session.id}' is {session.state.value}; it can run code only "
                "when ready." + (f" It failed with: {session.error}" if session.error else "")
            )
        return session.kernel

    def _app_env(self, config: Mapping[str, Any], workspace: str) -> dict[str, str]:
        """What an app's code needs to talk back to Hypha (as the reference worker sets)."""
        values = {
            "HYPHA_SERVER_URL": config.get("server_url") or self.server_url,
            "HYPHA_WORKSPACE": workspace,
            "HYPHA_CLIENT_ID": config.get("client_id"),
            "HYPHA_TOKEN": config.get("token"),
            "HYPHA_APP_ID": config.get("app_id"),
        }
        return {key: str(value) for key, value in values.items() if value}

    async def _entry_point(
        self,
        entry_point: str | None,
        app_files: AppFiles | None,
        progress: Callable,
        session: Session,
    ) -> str | None:
        """The code to run at start: the app's entry point file, read from the server."""
        if not entry_point:
            return None
        if app_files is None:
            message = (
                f"Ignoring entry_point '{entry_point}': this start names no app "
                "(app_id, artifact_id or app_files_base_url), so there are no files "
                "to read it from. The session starts without it."
            )
            session.log.add("info", message)
            await progress({"type": "warning", "stage": "entry_point", "message": message})
            return None
        await progress(
            {
                "type": "info",
                "stage": "entry_point",
                "message": f"Reading entry point {entry_point}",
            }
        )
        return await app_files.read_text(
            str(entry_point), max_bytes=self.settings.max_entry_point_bytes
        )

    async def _run_entry_point(
        self,
        session: Session,
        entry_point: str,
        code: str,
        config: Mapping[str, Any],
        progress: Callable,
    ) -> None:
        await progress({"type": "info", "stage": "entry_point", "message": "Running entry point"})

        timeout = config.get("timeout") or self.settings.kernel_start_timeout
        result = await session.kernel.execute(
            code, timeout=float(timeout), output_callback=session.record_output
        )
        if result.get("status") != "ok":
            error = result.get("error") or {}
            traceback = "\n".join(error.get("traceback") or [])
            kernel_log = await session.kernel.log_tail()
            if kernel_log:
                session.log.add("stderr", kernel_log)
                traceback += f"\nLast lines of the kernel's own output:\n{kernel_log}"
            raise AppFileError(
                f"The entry point '{entry_point}' raised "
                f"{error.get('ename')}: {error.get('evalue')}\n{traceback}"
            )

    async def _stop_session(self, session: Session) -> None:
        """The one way a session ends on request (stop, worker shutdown)."""
        if session.state == SessionState.STOPPING:
            return
        starting = session.start_task if session.state == SessionState.STARTING else None
        session.state = SessionState.STOPPING
        if starting is not None and starting is not asyncio.current_task():
            # Cancel the start (a build child is killed, a half-built env removed) before
            # releasing, or it would go on and launch a kernel nobody owns.
            starting.cancel()
            await asyncio.wait({starting})
        await self._release(session, keep_record=False)

    async def _release(self, session: Session, *, keep_record: bool) -> None:
        """Stop the kernel and delete the session's folders; never raises."""
        kernel, session.kernel = session.kernel, None
        if kernel is not None:
            with contextlib.suppress(Exception):
                await kernel.shutdown()
        for folder in (session.workdir, session.runtime_dir):
            await asyncio.to_thread(shutil.rmtree, folder, True)
        if keep_record:
            return
        session.state = SessionState.STOPPED
        self.sessions.remove(session)


def _session_id(raw: object) -> str:
    if raw is None or raw == "":
        return uuid.uuid4().hex
    if not isinstance(raw, str) or len(raw) > MAX_SESSION_ID_LENGTH or "\0" in raw:
        raise CondaWorkerError(
            f"config['id'] must be a string of at most {MAX_SESSION_ID_LENGTH} characters."
        )
    return raw


def _execute_timeout(config: Mapping[str, Any] | None, default: float | None) -> float | None:
    raw = (config or {}).get("timeout", default)
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw <= 0:
        raise CondaWorkerError(
            f"config['timeout'] must be a positive number of seconds, got {raw!r}; "
            "leave it out to let the cell run until it finishes."
        )
    return float(raw)


def _platform() -> str:
    """The conda subdir of this machine, for cache keys. Worked out here rather than with
    rattler's ``Subdir.current()`` so the server process never imports rattler (builds
    run it in a child, where a crash cannot take the server down)."""
    import platform
    import sys

    machine = platform.machine().lower()
    arch = {"x86_64": "64", "amd64": "64", "aarch64": "aarch64", "arm64": "arm64"}.get(
        machine, machine
    )
    system = {"linux": "linux", "darwin": "osx", "win32": "win"}.get(sys.platform, sys.platform)
    return f"{system}-{arch}"
