"""Command line: the standalone worker (default), ``serve`` and ``channel build``.

python -m hypha_conda_plugin --server-url URL --workspace WS --token T
python -m hypha_conda_plugin serve [--port 9527]
python -m hypha_conda_plugin channel build OUT [REQUIREMENT ...]
python -m hypha_conda_plugin envs list|prune [--cache-dir DIR] ...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from hypha_conda_plugin import __version__
from hypha_conda_plugin.settings import Settings, SettingsError

logger = logging.getLogger("hypha_conda_plugin")


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypha_conda_plugin",
        description="Run the conda worker on this machine and register it with a Hypha "
        "server. Every flag can also come from a HYPHA_* variable. Other "
        "commands: 'serve' (local Hypha server with the worker), 'channel build' "
        "(offline conda channel).",
    )
    add = parser.add_argument
    add("--server-url", help="Hypha server URL (HYPHA_SERVER_URL)")
    add("--workspace", help="workspace to register in (HYPHA_WORKSPACE)")
    add("--token", help="token for that workspace (HYPHA_TOKEN)")
    add("--service-id", help="service id (HYPHA_SERVICE_ID, default conda-worker)")
    add(
        "--visibility",
        choices=["public", "protected"],
        help="service visibility (HYPHA_VISIBILITY, default protected)",
    )
    add("--cache-dir", help="environment cache (HYPHA_CACHE_DIR, default ~/.hypha_conda_cache)")
    add(
        "--working-dir",
        help="session folders (HYPHA_WORKING_DIR, default /tmp/hypha_sessions_<id>)",
    )
    add(
        "--authorized-workspaces",
        help="comma-separated workspaces allowed to use the worker (HYPHA_AUTHORIZED_WORKSPACES)",
    )
    add(
        "--package-manager",
        choices=["auto", "mamba", "micromamba", "conda", "rattler"],
        help="what builds environments (CONDA_PACKAGE_MANAGER, default auto: mamba, then "
        "micromamba, then conda from PATH, then the embedded solver)",
    )
    add("--verbose", "-v", action="store_true", help="debug logging")
    add("--version", action="version", version=f"hypha-conda-plugin {__version__}")
    return parser


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypha_conda_plugin serve",
        description="Start a local Hypha server (127.0.0.1) with the conda worker and an "
        "in-memory S3 store for the artifact manager, until Ctrl+C.",
    )
    parser.add_argument("--port", type=int, default=9527)
    parser.add_argument(
        "--data-dir", default=".hypha-local", help="folder for the server's database and logs"
    )
    parser.add_argument("--no-s3", action="store_true", help="run without the artifact manager")
    parser.add_argument(
        "--mcp",
        action="store_true",
        help="serve services as MCP tools too (Hypha's --enable-mcp), the worker at "
        "/public/mcp/conda-worker/mcp",
    )
    return parser


def _channel_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypha_conda_plugin channel",
        description="Build an offline conda channel from this Python and PyPI wheels; use it "
        "with CONDA_CHANNEL_ALIAS where conda-forge cannot be reached.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="build or update a channel")
    build.add_argument("out", type=Path, help="channel root to write")
    build.add_argument(
        "requirements",
        nargs="*",
        help="extra PyPI requirements (ipykernel, hypha-rpc, pip always included)",
    )
    return parser


def _envs_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypha_conda_plugin envs",
        description="Inspect or prune the environment cache. Safe while workers run on it: "
        "an environment that anything uses (in any process) is never removed.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    cache_help = "cache folder (default: HYPHA_CACHE_DIR, CONDA_CACHE_DIR, ~/.hypha_conda_cache)"
    listing = sub.add_parser("list", help="key, spec, size, age, last use, in use")
    listing.add_argument("--cache-dir", help=cache_help)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    prune = sub.add_parser("prune", help="remove environments nothing uses")
    prune.add_argument("--cache-dir", help=cache_help)
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every environment not in use")
    which.add_argument(
        "--older-than", type=float, metavar="DAYS", help="environments built before that"
    )
    which.add_argument("keys", nargs="*", default=[], metavar="KEY", help="keys (or prefixes)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request drowns what matters unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = ("serve", "channel", "envs", "worker")
    command = args[0] if args and args[0] in commands else "worker"
    if args and args[0] == command:
        args = args[1:]
    handlers = {
        "worker": _run_worker,
        "serve": _run_serve,
        "channel": _run_channel,
        "envs": _run_envs,
    }
    sys.exit(handlers[command](args))


def _run_worker(argv: list[str]) -> int:
    parser = _worker_parser()
    options = parser.parse_args(argv)
    try:
        settings = Settings.from_cli(vars(options))
    except SettingsError as error:
        parser.error(str(error))
    _configure_logging(settings.verbose)
    return asyncio.run(_serve_worker(settings))


async def _serve_worker(settings: Settings) -> int:
    from hypha_rpc import connect_to_server

    from hypha_conda_plugin.envs.selection import select_package_manager
    from hypha_conda_plugin.worker import CondaWorker

    selection = select_package_manager(settings)
    manager = selection.chosen
    print("Starting Hypha conda worker", __version__)
    print(f"  Package Manager: {manager}\n    ({selection.reason})")
    print(f"  Server URL: {settings.server_url}\n  Workspace: {settings.workspace}")
    print(f"  Service ID: {settings.service_id}\n  Visibility: {settings.visibility}")
    print(f"  Cache dir: {settings.cache_dir}\n  Working dir: {settings.working_dir}")
    try:
        server = await connect_to_server(
            {
                "server_url": settings.server_url,
                "workspace": settings.workspace,
                "token": settings.token,
            }
        )
    except Exception as error:
        print(f"Error: could not connect to {settings.server_url}: {error}", file=sys.stderr)
        return 1
    worker = CondaWorker(settings)
    try:
        sandbox = await worker.prepare()
        print(f"  Isolation: {sandbox.isolation.detail}", flush=True)
    except Exception as error:
        print(f"  Isolation: unavailable, sessions will be refused: {error}", flush=True)
    service = await server.register_service(worker.service_definition())
    print(
        f"Worker (using {manager}) registered as {service.id}; press Ctrl+C to stop.",
        flush=True,
    )
    stop = _stop_on_signals()
    await stop.wait()
    print("Stopping: shutting down sessions...", flush=True)
    await worker.close()
    with contextlib.suppress(Exception):
        await server.disconnect()
    return 0


def _stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl+C or SIGTERM (how Kubernetes and Docker stop containers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _run_serve(argv: list[str]) -> int:
    options = _serve_parser().parse_args(argv)
    _configure_logging(verbose=False)
    return asyncio.run(_serve_local(options))


async def _serve_local(options: argparse.Namespace) -> int:
    from hypha_conda_plugin.local_server import LocalServer

    s3 = not options.no_s3
    if s3 and importlib.util.find_spec("moto") is None:
        print(
            "moto is not installed: starting without the artifact manager "
            "(pip install 'moto[server]' to have it)."
        )
        s3 = False
    server = LocalServer(Path(options.data_dir), port=options.port, s3=s3, mcp=options.mcp)
    stop = _stop_on_signals()
    async with server:
        print(f"Hypha server with the conda worker at {server.url}")
        if options.mcp:
            print(f"  MCP endpoint: {server.url}/public/mcp/conda-worker/mcp")
        print(f"  root token: {server.root_token}\n  logs: {server.log_path}", flush=True)
        await stop.wait()
    return 0


def _run_channel(argv: list[str]) -> int:
    options = _channel_parser().parse_args(argv)
    from hypha_conda_plugin.channel import ChannelBuildError, build_channel

    try:
        result = build_channel(options.out, options.requirements)
    except ChannelBuildError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(f"Channel ready at {result.root} ({len(result.packages)} packages).")
    print(f"Use it with:\n  export CONDA_CHANNEL_ALIAS={result.alias_url}")
    return 0


def _run_envs(argv: list[str]) -> int:
    parser = _envs_parser()
    options = parser.parse_args(argv)
    from hypha_conda_plugin.envs import tool
    from hypha_conda_plugin.envs.store import CacheLayout

    try:
        settings = Settings.for_cache_tool(options.cache_dir)
    except SettingsError as error:
        parser.error(str(error))
    layout = CacheLayout(settings.envs_dir)
    if options.action == "list":
        print(tool.list_text(layout, as_json=options.json))
        return 0
    if options.older_than is not None and not options.older_than >= 0:
        parser.error("--older-than needs a number of days, 0 or more")
    lines, code = tool.prune(
        layout,
        everything=options.all,
        older_than_days=options.older_than,
        keys=options.keys,
        dry_run=options.dry_run,
    )
    for line in lines:
        print(line, file=sys.stderr if line.startswith("error:") else sys.stdout)
    return code
