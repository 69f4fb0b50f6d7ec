"""CondaWorker: the service Hypha clients and the app controller call.

This layer owns the RPC surface only: it works out who is calling, checks they may,
validates input, and hands the work to the environment cache, the session registry and
the kernel. Every method is async and leaves the event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypha_conda_plugin import __version__, validation
from hypha_conda_plugin.aio import gather_or_cancel
from hypha_conda_plugin.app_version import choose_version
from hypha_conda_plugin.callbacks import DRAIN_TIMEOUT, Progress
from hypha_conda_plugin.envs.bytecode import compile_kernel_start
from hypha_conda_plugin.envs.cache import EnvCache
from hypha_conda_plugin.envs.completion import EnvironmentCompletion
from hypha_conda_plugin.envs.eviction import DAY, CacheLimits
from hypha_conda_plugin.envs.selection import make_builder
from hypha_conda_plugin.envs.spec import EnvSpec
from hypha_conda_plugin.errors import (
    AnonymousCallerError,
    AppFileError,
    CondaWorkerError,
    QuotaExceededError,
    SessionNotFoundError,
    SessionStateError,
    WorkspaceNotAuthorizedError,
)
from hypha_conda_plugin.instances import WorkingRoot
from hypha_conda_plugin.kernel import Kernel
from hypha_conda_plugin.launcher import KernelLauncher, session_bootstrap
from hypha_conda_plugin.load import worker_load
from hypha_conda_plugin.pool import KernelPool
from hypha_conda_plugin.sandbox import Sandbox, detect_sandbox, make_worker_non_dumpable
from hypha_conda_plugin.service_schema import apply_schemas
from hypha_conda_plugin.sessions import LOG_TYPES, Session, SessionManager, SessionState
from hypha_conda_plugin.settings import SUPPORTED_APP_TYPE, Settings
from hypha_conda_plugin.shared_identity import with_caller_identity
from hypha_conda_plugin.stage_rules import parse_stage_rules
from hypha_conda_plugin.staging import stage_files
from hypha_conda_plugin.staging_limits import StagingLimits
from hypha_conda_plugin.start_request import StartRequest
from hypha_conda_plugin.tokens import TokenVerifier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who is calling, from the context Hypha attaches to each call."""

    workspace: str
    user_id: str | None
    is_anonymous: bool = False
    roles: tuple[str, ...] = ()

    @property
    def is_root(self) -> bool:
        """The server itself (its app controller, its admins): only Hypha can say so, in
        the context it attaches to every call of a ``require_context`` service."""
        return self.user_id == "root"

    @property
    def is_app_controller(self) -> bool:
        """Hypha's app controller (server-apps): it calls workers as the root user from the
        server's own client in the ``public`` workspace (``ws == "public"``, ``from ==
        "public/<server_id>"``), whichever workspace the app belongs to. No user client
        can join ``public``; Hypha's MCP/HTTP adapters there are caught by
        ``shared_identity`` before a call gets here."""
        return self.is_root and self.workspace == "public"

    @property
    def is_server_admin(self) -> bool:
        return self.is_root or "admin" in self.roles

    @classmethod
    def from_context(cls, context: Mapping[str, Any] | None) -> Caller:
        if not context or not context.get("ws"):
            # Hypha always attaches a context to our methods (require_context), and
            # overrides any the caller sends. None means an in-process caller that did
            # not say who it acts for: refuse rather than guess.
            raise WorkspaceNotAuthorizedError(
                "The call carries no caller context (workspace and user); the worker "
                "serves calls through Hypha only."
            )
        user = context.get("user") or {}
        roles = user.get("roles") or ()
        return cls(
            workspace=str(context["ws"]),
            user_id=user.get("id"),
            is_anonymous=bool(user.get("is_anonymous")),
            roles=tuple(str(r) for r in roles) if isinstance(roles, list | tuple) else (),
        )


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
        self.envs = EnvCache(
            settings.envs_dir,
            make_builder(settings),
            channel_alias=settings.channel_alias,
            platform=_platform(),
            pip_timeout=settings.build_timeout,
            finish=self._finish_environment,
            max_concurrent_builds=settings.max_concurrent_builds,
            limits=CacheLimits(
                max_envs=settings.cache_max_envs,
                max_age=settings.cache_max_age_days * DAY,
                max_size=settings.cache_max_size,
                sweep_interval=settings.cache_sweep_interval,
            ),
        )
        self._background: set[asyncio.Task[Any]] = set()
        self.completion = EnvironmentCompletion(self.envs)
        self.sessions = SessionManager(settings.max_log_entries, settings.max_log_bytes)
        # Checks app tokens and agents' tokens with the server this worker belongs to.
        self.tokens = TokenVerifier(self.server_url)
        self.root = WorkingRoot(settings.working_dir)
        self.sandbox: Sandbox | None = None
        self.launcher: KernelLauncher | None = None
        self.pool: KernelPool | None = None
        self._prepared: asyncio.Task[None] | None = None

    async def prepare(self) -> Sandbox:
        """Find the sandbox, claim a run folder, sweep what dead runs left; once.

        Called before the service is registered (so the start-up log says which isolation
        sessions get) and again, cheaply, by every start.
        """
        if self._prepared is None:
            self._prepared = asyncio.ensure_future(self._prepare())
        await asyncio.shield(self._prepared)
        assert self.sandbox is not None
        return self.sandbox

    async def _prepare(self) -> None:
        try:
            sandbox = await detect_sandbox(self.settings.sandbox)
        except Exception:
            self._prepared = None  # a later start says why again
            raise
        if sandbox.enabled:
            logger.info("Isolation: %s", sandbox.isolation.detail)
        else:
            dumpable = make_worker_non_dumpable()
            logger.warning(
                "Isolation: NO SANDBOX (%s). Kernels run as this worker's user with private "
                "folders only; they can see other processes%s. Run standalone workers in "
                "their own pods and keep secrets out of the server's environment.",
                sandbox.isolation.detail,
                "" if dumpable else ", and the worker could not make itself non-dumpable",
            )
        await self.root.open()
        self.launcher = KernelLauncher(
            sandbox,
            run_id=self.root.run_id,
            start_timeout=self.settings.kernel_start_timeout,
            memory_limit=self.settings.session_memory_limit,
            max_output_bytes=self.settings.max_output_bytes,
        )
        self.pool = KernelPool(
            self.launcher,
            self.root,
            size=self.settings.kernel_pool_size,
            idle_seconds=self.settings.kernel_pool_idle,
            has_room=lambda: (
                self.sessions.count() + self.pool.warm_count < self.settings.max_sessions
            ),
        )
        # The cache asks for an environment it must remove or rebuild back.
        self.envs.on_reclaim = self._reclaim
        self.sandbox = sandbox
        self.envs.start_maintenance()  # sweeps what a killed run left, then periodically
        self._spawn(self._housekeeping())

    async def _finish_environment(self, prefix: Path, progress: Progress) -> None:
        """Before a freshly built environment is marked ready: the bytecode a kernel
        needs at start (the rest follows in the background, see envs/bytecode.py)."""
        await progress(
            {"type": "info", "stage": "environment", "message": "Compiling the kernel's bytecode"}
        )
        await compile_kernel_start(prefix)

    async def _reclaim(self, key: str) -> None:
        """Let go of environment ``key`` where we hold it only for ourselves: its warm
        kernels and its background completion."""
        assert self.pool is not None
        await asyncio.gather(self.pool.reclaim(key), self.completion.let_go(key))

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        """Background work of the worker; cancelled (children killed) by close()."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ----------------------------------------------------------------- registration
    def service_definition(self) -> dict[str, Any]:
        """The Hypha service: a server-app-worker for conda-jupyter-kernel apps."""
        config: dict[str, Any] = {"visibility": self.settings.visibility, "require_context": True}
        if self.settings.visibility == "protected":
            # Hypha lets a protected service be called from its own workspace and from
            # the workspaces listed here. Its app controller calls workers from `public`
            # (as root): listing `public` lets it through, and no user client can join
            # `public`. Which app workspaces the controller may start sessions for is
            # checked by the worker itself (_owner). Hypha accepts this list only on
            # protected services; a public worker checks CONDA_AUTHORIZED_WORKSPACES alone.
            listed = {*self.settings.authorized_workspaces, "public"}
            config["authorized_workspaces"] = sorted(listed)
        service = {
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
            "get_status": self.get_status,
            "compile": self.compile,
            "list_environments": self.list_environments,
            "shutdown": self.shutdown,
            "get_load": self.get_load,
        }
        # Agent-readable schemas (what Hypha's MCP endpoint lists as tools), and a
        # `token` argument naming callers that come through Hypha's MCP/HTTP adapters.
        return apply_schemas(service, lambda method: with_caller_identity(method, self.tokens))

    # ----------------------------------------------------------------- public methods
    async def start(self, config: dict[str, Any], context: dict | None = None) -> str:
        """Build or reuse the environment, start a kernel, run the app's entry point."""
        caller = self._authorize(context)
        request = StartRequest.parse(
            config,
            workspace=await self._owner(caller, config),
            from_server=caller.is_root,
            server_url=self.server_url,
            settings=self.settings,
        )
        sandbox = await self.prepare()
        self._check_quota(request.workspace, request.session_id)
        session = self.sessions.create(request.workspace, request.session_id, request.app_id)
        session.start_task = asyncio.current_task()
        session.isolation = sandbox.isolation.mode
        session.from_server = caller.is_root
        # The client's callback is fed by a task of its own: progress() never waits for
        # it, so the environment cache may call it while holding its locks.
        delivery = session.deliver_to(request.progress_callback, "progress_callback")

        async def progress(message: dict[str, Any]) -> None:
            session.log.add("progress", message.get("message", ""))
            delivery.put(message)

        try:
            await progress(
                {"type": "info", "stage": "start", "message": f"Starting session {session.id}"}
            )
            if request.app_files is not None:
                request = request.reading(
                    await choose_version(
                        request.app_files, request.config, request.manifest, progress
                    )
                )
            session.env = await self.envs.acquire(request.spec, progress)
            if not session.env.reused:
                self._spawn(self.completion.run(request.spec))
            await self._start_kernel(session, request, progress)
            if session.kernel is not None and request.app_env:
                await self._bootstrap(session, request.app_env)
            if session.entry_code is not None:
                await self._run_entry_point(session, request, progress)
        except BaseException as error:
            if session.state == SessionState.STOPPING:
                # stop() cancelled us; it releases the session itself.
                raise SessionStateError(
                    f"Session '{session.id}' was stopped while starting."
                ) from error
            session.state = SessionState.FAILED
            session.error = str(error) or type(error).__name__
            session.log.add("error", f"Start failed: {error}")
            delivery.put(
                {"type": "error", "stage": "start", "message": f"Failed to start session: {error}"}
            )
            session.start_task = None
            await asyncio.shield(self._release(session, keep_record=True))
            cancelled = isinstance(error, asyncio.CancelledError)
            await session.finish_delivery(delivery, grace=0 if cancelled else DRAIN_TIMEOUT)
            raise
        session.start_task = None
        session.entry_code = None
        session.state = SessionState.READY
        session.last_activity = time.monotonic()
        self._keep_warm(request)
        await progress(
            {
                "type": "success",
                "stage": "ready",
                "progress": 1.0,
                "message": f"Session {session.id} is ready",
            }
        )
        await session.finish_delivery(delivery)
        return session.id

    async def _start_kernel(
        self, session: Session, request: StartRequest, progress: Callable
    ) -> None:
        """A warm kernel from the pool, or one started in a fresh instance folder while
        staging and the entry point's download run."""
        assert self.launcher is not None and self.pool is not None and session.env is not None
        jobs: list[Awaitable[Any]] = []
        warm = self.pool.take(session.env.key)
        if warm is not None:
            session.instance, session.kernel = warm.instance, warm.kernel
            await warm.lease.release()  # the session holds a lease of its own
            await progress({"type": "info", "stage": "kernel", "message": "Using a warm kernel"})
        else:
            session.instance = self.root.new_instance()
            prefix = session.env.prefix
            await progress({"type": "info", "stage": "kernel", "message": "Starting kernel"})
            version = await self.launcher.python_version_of(prefix)
            await asyncio.to_thread(session.instance.create, version)
            session.kernel = self.launcher.kernel_for(session.instance, prefix)
            jobs.append(session.kernel.start(timeout=self.settings.kernel_start_timeout))
        instance = session.instance
        if request.stage_rules:
            assert request.app_files is not None
            jobs.append(
                stage_files(
                    request.stage_rules,
                    dest=instance.work,
                    files=request.app_files,
                    progress=progress,
                    limits=StagingLimits.from_settings(self.settings),
                )
            )
        jobs.append(self._read_entry_point(session, request, progress))
        await gather_or_cancel(jobs)

    def _keep_warm(self, request: StartRequest) -> None:
        """Sessions start on this environment: keep kernels of it warm for the next."""
        assert self.pool is not None

        async def lease() -> Any:
            # Not a use: warm kernels must not keep an environment first in LRU order.
            return await self.envs.acquire(request.spec, _quiet, touch=False)

        self.pool.want(self.envs.key_for(request.spec), lease)

    def _check_quota(self, workspace: str, session_id: str) -> None:
        """Refuse a start beyond the worker's session limits; make room among warm
        kernels first (they are only a cache)."""
        settings = self.settings
        with contextlib.suppress(SessionNotFoundError):
            if not self.sessions.get(workspace, session_id).ended:
                return  # a duplicate id: create() explains that better
        if self.sessions.count(workspace) >= settings.max_sessions_per_workspace:
            raise QuotaExceededError(
                f"Workspace '{workspace}' already has {self.sessions.count(workspace)} sessions "
                f"on this worker, the most it allows (CONDA_MAX_SESSIONS_PER_WORKSPACE="
                f"{settings.max_sessions_per_workspace}). Stop one you no longer need "
                "(list_sessions() shows them) and start again."
            )
        if self.sessions.count() >= settings.max_sessions:
            raise QuotaExceededError(
                f"This worker runs {self.sessions.count()} sessions, the most it allows "
                f"(CONDA_MAX_SESSIONS={settings.max_sessions}). Try again later or use "
                "another worker."
            )
        assert self.pool is not None
        while self.sessions.count() + self.pool.warm_count >= settings.max_sessions:
            if not self.pool.evict_one():
                break

    async def _housekeeping(self) -> None:
        """Periodic chores: stop idle sessions, let idle warm kernels go."""
        timeout = self.settings.idle_timeout
        period = min(30.0, timeout / 4) if timeout else 30.0
        period = min(period, self.settings.kernel_pool_idle / 4)
        while True:
            await asyncio.sleep(period)
            if self.pool is not None:
                self.pool.shrink()
            if timeout:
                await self._stop_idle_sessions(timeout)

    async def _stop_idle_sessions(self, timeout: float) -> None:
        """Direct sessions nobody executed in for ``timeout`` seconds (a client that went
        away); apps are the app controller's to stop."""
        now = time.monotonic()
        idle = [
            s
            for s in self.sessions.list()
            if s.state == SessionState.READY
            and not s.from_server
            and s.running == 0
            and now - s.last_activity > timeout
        ]
        for session in idle:
            message = (
                f"Stopped after {timeout:g} s without an execute (CONDA_IDLE_TIMEOUT); "
                "start a new session to continue."
            )
            session.log.add("info", message)
            session.error = message
            logger.info("Session %s/%s %s", session.workspace, session.id, message)
            await self._stop_session(session, keep_record=True)

    async def _bootstrap(self, session: Session, variables: Mapping[str, str]) -> None:
        """Give the kernel its session's variables before any user code runs."""
        assert session.kernel is not None
        result = await session.kernel.execute(
            session_bootstrap(variables), timeout=self.settings.kernel_start_timeout, silent=True
        )
        if result.get("status") != "ok":
            raise SessionStateError(f"The kernel could not be prepared: {result.get('error')}")

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
        options = validation.options(config, "execute()'s config")
        timeout = validation.optional_time_limit(
            options.get("timeout"), "config['timeout']", self.settings.default_execute_timeout
        )
        validation.callback(progress_callback, "progress_callback")
        validation.callback(output_callback, "output_callback")
        kernel = self._live_kernel(session)
        # Callbacks are fed by tasks of their own: a slow client never holds the kernel's
        # reader, so it does not count against the cell's time limit.
        progress = session.deliver_to(progress_callback, "progress_callback of execute")
        outputs = session.deliver_to(output_callback, "output_callback of execute")
        progress.put({"type": "info", "stage": "execute", "message": "Executing code"})

        def on_output(item: dict[str, Any]) -> None:
            session.record_output(item)
            outputs.put(item)

        session.running += 1
        session.last_activity = time.monotonic()
        session.state = SessionState.BUSY
        try:
            result = await kernel.execute(script, timeout=timeout, output_callback=on_output)
        except BaseException:
            await session.finish_delivery(outputs, grace=0)
            await session.finish_delivery(progress, grace=0)
            raise
        finally:
            session.running -= 1
            session.last_activity = time.monotonic()
            if session.state == SessionState.BUSY and session.running == 0:
                session.state = SessionState.READY
        session.executions += 1
        if result.get("status") == "error" and result.get("error"):
            error = result["error"]
            session.log.add("error", f"{error.get('ename')}: {error.get('evalue')}")
        progress.put(
            {
                "type": "success" if result.get("status") == "ok" else "error",
                "stage": "execute",
                "message": f"Execution finished: {result.get('status')}",
            }
        )
        # Bounded, and after the cell ended: the client normally has every item (in
        # order) before the result, and a stuck callback cannot hold the call for long.
        await asyncio.gather(session.finish_delivery(outputs), session.finish_delivery(progress))
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
        offset, limit = validation.log_window(offset, limit)
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

    async def get_status(self, context: dict | None = None) -> dict[str, Any]:
        """How this worker is doing: isolation, sessions (all and the caller's), kernels
        waiting in the pool. Nothing of other workspaces' sessions beyond a count."""
        caller = self._authorize(context)
        return {
            "version": __version__,
            "isolation": self.sandbox.isolation.describe() if self.sandbox else None,
            "sessions": self.sessions.count(),
            "sessions_of_caller": self.sessions.count(caller.workspace),
            "max_sessions": self.settings.max_sessions,
            "max_sessions_per_workspace": self.settings.max_sessions_per_workspace,
            "warm_kernels": self.pool.ready_counts() if self.pool else {},
        }

    async def get_session_info(self, session_id: str, context: dict | None = None) -> dict:
        return self._session(session_id, context).info()

    async def compile(
        self, manifest: dict, files: list, config: dict | None = None, context: dict | None = None
    ) -> tuple[dict, list]:
        """Validate a manifest when an app is installed, so errors surface early."""
        caller = self._authorize(context)
        installing_for = (config or {}).get("workspace")
        if caller.is_app_controller and installing_for:
            # Hypha builds this config itself (no additional_kwargs): the installer's
            # workspace. Refuse now rather than at every start.
            if not self._workspace_allowed(str(installing_for)):
                raise WorkspaceNotAuthorizedError(
                    f"Apps of workspace '{installing_for}' may not run on this worker; "
                    "install it with a worker that serves that workspace."
                )
        EnvSpec.from_manifest(manifest, default_channels=self.settings.default_channels)
        parse_stage_rules(manifest.get("files_to_stage"))
        manifest = dict(manifest)
        manifest.setdefault("entry_point", "main.py")
        for key in ("dependencies", "channels"):
            if isinstance(manifest.get(key), str):
                # Stored as the one-item list it means: Hypha's app model wants a list.
                manifest[key] = [manifest[key]]
        return manifest, files

    async def get_load(self, context: dict | None = None) -> float:
        """How busy this worker is, for Hypha's ``select:min:get_load`` placement."""
        self._authorize(context)
        return worker_load(self.sessions.list())

    async def list_environments(self, context: dict | None = None) -> list[dict[str, Any]]:
        """The cached environments (key, redacted spec, size, created, last used, in use).

        For the worker's administrators only, since it shows every tenant's specs: the
        server's admins (root or the admin role), and for a standalone worker also the
        users of the workspace it is registered in (they hold its token and run it).
        """
        caller = Caller.from_context(context)
        registered_in = None if self.in_server else self.settings.workspace
        if not (caller.is_server_admin or (registered_in and caller.workspace == registered_in)):
            raise WorkspaceNotAuthorizedError(
                "list_environments is for the worker's administrators: the server's admins, "
                "or for a standalone worker the workspace it is registered in."
            )
        return await self.envs.list_environments()

    async def shutdown(self, context: dict | None = None) -> None:
        """Stop every session (the server's own call when it goes away)."""
        if not Caller.from_context(context).is_root:
            raise WorkspaceNotAuthorizedError("Only the server may shut the worker down.")
        await self.close()

    async def close(self) -> None:
        """Stop every session and remove this run's folders (in-process: worker exit)."""
        await asyncio.gather(
            *(self._stop_session(s) for s in self.sessions.list() if not s.ended),
            return_exceptions=True,
        )
        if self.pool is not None:
            await self.pool.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._prepared is not None and self._prepared.done():
            await self.root.close()
        await self.envs.close()

    # ----------------------------------------------------------------- helpers
    def _authorize(self, context: Mapping[str, Any] | None) -> Caller:
        caller = Caller.from_context(context)
        if caller.is_anonymous and not self.settings.allow_anonymous:
            raise AnonymousCallerError(
                "Anonymous visitors may not run code on this worker. Sign in (log in to the "
                "Hypha server, or connect with a token from its web UI or generate_token) "
                "and call again; the operator can admit visitors with "
                "CONDA_ALLOW_ANONYMOUS=true."
            )
        if not caller.is_root and not self._workspace_allowed(caller.workspace):
            raise WorkspaceNotAuthorizedError(
                f"Workspace '{caller.workspace}' may not use this worker; ask its operator to "
                "add it to CONDA_AUTHORIZED_WORKSPACES."
            )
        return caller

    def _workspace_allowed(self, workspace: str) -> bool:
        """Whether sessions may belong to ``workspace``: the authorized list if there is
        one; else, for a protected worker that knows its workspace (standalone), that
        workspace alone, as Hypha itself allows; else any."""
        listed = self.settings.authorized_workspaces
        home = self.settings.workspace
        if listed:
            return workspace in listed or workspace == home
        if home and self.settings.visibility == "protected":
            return workspace == home
        return True

    async def _owner(self, caller: Caller, config: object) -> str:
        """The workspace a new session belongs to: the caller's; for the server (root) the
        app's workspace the config names, which for the app controller must be proven by
        the app's token (whoever starts an app can overwrite any config key through
        Hypha's ``additional_kwargs``, but not forge a token for another workspace)."""
        workspace = config.get("workspace") if isinstance(config, Mapping) else None
        if not (caller.is_root and workspace):
            return caller.workspace
        workspace = str(workspace)
        if caller.is_app_controller:
            user = await self.tokens.verify(config.get("token"))
            if user.workspace != workspace:
                raise WorkspaceNotAuthorizedError(
                    f"The app's token was issued for workspace '{user.workspace}', but the "
                    f"start names workspace '{workspace}'; an app runs in its own workspace."
                )
        if not self._workspace_allowed(workspace):
            raise WorkspaceNotAuthorizedError(
                f"Apps of workspace '{workspace}' may not run on this worker; its operator "
                "lists the workspaces it serves (CONDA_AUTHORIZED_WORKSPACES or "
                "--authorized-workspaces; a protected standalone worker serves its own)."
            )
        return workspace

    def _session(self, session_id: str, context: Mapping[str, Any] | None) -> Session:
        """The caller's session; the server finds one by the workspace in a
        ``workspace/client_id`` id, the app controller's form."""
        caller = self._authorize(context)
        if not isinstance(session_id, str) or not session_id:
            raise CondaWorkerError("A session id (the string start() returned) is required.")
        try:
            return self.sessions.get(caller.workspace, session_id)
        except SessionNotFoundError:
            if caller.is_app_controller and "/" in session_id:
                # The controller's ids are "<app workspace>/<client id>".
                return self.sessions.get(session_id.split("/", 1)[0], session_id)
            raise

    @staticmethod
    def _live_kernel(session: Session) -> Kernel:
        if session.kernel is None or session.state not in (SessionState.READY, SessionState.BUSY):
            raise SessionStateError(
                f"Session '{session.id}' is {session.state.value}; it can run code only "
                "when ready." + (f" It failed with: {session.error}" if session.error else "")
            )
        return session.kernel

    async def _read_entry_point(
        self, session: Session, request: StartRequest, progress: Callable
    ) -> None:
        """The code to run at start: the app's entry point file, read from the server."""
        entry_point, app_files = request.entry_point, request.app_files
        if not entry_point:
            return
        if app_files is None:
            message = (
                f"Ignoring entry_point '{entry_point}': this start names no app "
                "(app_id or artifact_id), so there are no files to read it from. The "
                "session starts without it."
            )
            session.log.add("info", message)
            await progress({"type": "warning", "stage": "entry_point", "message": message})
            return
        await progress(
            {
                "type": "info",
                "stage": "entry_point",
                "message": f"Reading entry point {entry_point}",
            }
        )
        session.entry_code = await app_files.read_text(
            entry_point, max_bytes=self.settings.max_entry_point_bytes
        )

    async def _run_entry_point(
        self, session: Session, request: StartRequest, progress: Callable
    ) -> None:
        assert session.kernel is not None and session.entry_code is not None
        await progress({"type": "info", "stage": "entry_point", "message": "Running entry point"})
        result = await session.kernel.execute(
            session.entry_code, timeout=request.entry_timeout, output_callback=session.record_output
        )
        if result.get("status") != "ok":
            error = result.get("error") or {}
            traceback = "\n".join(error.get("traceback") or [])
            kernel_log = await session.kernel.log_tail()
            if kernel_log:
                session.log.add("stderr", kernel_log)
                traceback += f"\nLast lines of the kernel's own output:\n{kernel_log}"
            raise AppFileError(
                f"The entry point '{request.entry_point}' raised "
                f"{error.get('ename')}: {error.get('evalue')}\n{traceback}"
            )

    async def _stop_session(self, session: Session, *, keep_record: bool = False) -> None:
        """The one way a session ends on request (stop, worker shutdown, idle timeout);
        ``keep_record`` keeps it listed, stopped, so its logs can say why."""
        if session.state == SessionState.STOPPING:
            return
        starting = session.start_task if session.state == SessionState.STARTING else None
        session.state = SessionState.STOPPING
        if starting is not None and starting is not asyncio.current_task():
            # Cancel the start (a build child is killed, a half-built env removed) before
            # releasing, or it would go on and launch a kernel nobody owns.
            starting.cancel()
            await asyncio.wait({starting})
        await self._release(session, keep_record=keep_record)
        if keep_record:
            session.state = SessionState.STOPPED

    async def _release(self, session: Session, *, keep_record: bool) -> None:
        """Stop the kernel, delete the session's folders, let go of its environment;
        never raises."""
        if not keep_record:
            session.cancel_deliveries()  # a failed start finishes its own delivery
        kernel, session.kernel = session.kernel, None
        if kernel is not None:
            with contextlib.suppress(Exception):
                await kernel.shutdown()
        if session.instance is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(session.instance.remove)
        env, session.env = session.env, None
        if env is not None:
            with contextlib.suppress(Exception):
                await env.release()
        if keep_record:
            return
        session.state = SessionState.STOPPED
        self.sessions.remove(session)


async def _quiet(_: dict[str, Any]) -> None:
    """Progress of the worker's own background work: nobody is listening."""


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
