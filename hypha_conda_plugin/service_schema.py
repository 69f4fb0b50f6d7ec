"""JSON schemas of the worker's service methods, written for the agents that read them.

Hypha publishes a function's ``__schema__`` (``{"name", "description", "parameters"}``,
the shape ``hypha_rpc.utils.schema.schema_function`` produces) with the service, and its
MCP endpoint (``--enable-mcp``, ``/{workspace}/mcp/{service_id}/mcp``) lists exactly the
functions that carry one as tools. The schemas live here, apart from the method bodies,
and ``apply_schemas`` attaches them when the service is registered. Callbacks
(``progress_callback``, ``output_callback``) stay out: a JSON caller cannot pass a
function, and every method works without them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hypha_conda_plugin.sessions import LOG_TYPES

TOKEN = {
    "type": "string",
    "description": "Your own Hypha access token (the one your MCP client sends as its "
    "Bearer token). Required when you call through Hypha's MCP or HTTP endpoints: they "
    "do not tell the worker who is calling, and your sessions belong to the token's "
    "workspace. Not needed over a normal Hypha connection.",
}
SESSION_ID = {
    "type": "string",
    "description": "The session id that start() returned (list_sessions() shows yours).",
}
MANIFEST = {
    "type": "object",
    "description": "What the session's conda environment contains.",
    "properties": {
        "dependencies": {
            "type": "array",
            "description": "Conda package specs such as 'python=3.11', 'numpy>=1.26', "
            "optionally with one {'pip': ['package', ...]} item for PyPI packages (as in "
            "an environment.yml). A single string means a one-item list. The worker adds "
            "python and ipykernel when missing.",
            "items": {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "object",
                        "properties": {"pip": {"type": "array", "items": {"type": "string"}}},
                        "required": ["pip"],
                    },
                ]
            },
        },
        "channels": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Conda channels, default ['conda-forge'].",
        },
    },
}


def _function(name: str, description: str, properties: dict[str, Any], required=()) -> dict:
    return {
        "name": name,
        "description": description,
        "parameters": {
            "type": "object",
            "properties": properties,
            "required": list(required),
        },
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "start": _function(
        "start",
        "Start a session: a Python (Jupyter) kernel in a conda environment built from "
        "config.manifest (or reused from the cache when the same dependencies were built "
        "before; a first build can take minutes). Returns the session id to pass to "
        "execute, get_logs and stop. Example config: {'manifest': {'dependencies': "
        "['python=3.11', 'numpy']}}. Stop the session when done.",
        {
            "config": {
                "type": "object",
                "description": "Session settings. Hypha's app controller adds more fields "
                "(app_id, token, entry_point, ...) when it starts an installed app.",
                "properties": {
                    "manifest": MANIFEST,
                    "id": {
                        "type": "string",
                        "description": "Optional session id (up to 256 characters); a "
                        "random one is made when left out.",
                    },
                },
                "required": ["manifest"],
            },
            "token": TOKEN,
        },
        required=["config"],
    ),
    "execute": _function(
        "execute",
        "Run Python code in a session's kernel, like a notebook cell: variables persist "
        "between calls. Returns {'status': 'ok'|'error', 'outputs': [...], 'error': None "
        "or {'ename', 'evalue', 'traceback'}, 'execution_count': n}. Printed text is in "
        "outputs items {'type': 'stream', 'name': 'stdout'|'stderr', 'text'}; the value of "
        "the last expression in {'type': 'execute_result', 'data': {'text/plain': ...}}.",
        {
            "session_id": SESSION_ID,
            "script": {"type": "string", "description": "The Python code to run."},
            "config": {
                "type": "object",
                "description": "Optional: {'timeout': seconds}; a cell still running then "
                "is interrupted and the result says so.",
                "properties": {"timeout": {"type": "number", "exclusiveMinimum": 0}},
            },
            "token": TOKEN,
        },
        required=["session_id", "script"],
    ),
    "get_logs": _function(
        "get_logs",
        "Read a session's log: what its cells and entry point printed (stdout, stderr), "
        "errors, and start-up progress. Returns {'items': [{'type', 'content'}], 'total', "
        "'offset', 'limit'}; page with offset and limit.",
        {
            "session_id": SESSION_ID,
            "type": {
                "type": "string",
                "enum": list(LOG_TYPES),
                "description": "Only entries of this type; all types when left out.",
            },
            "offset": {"type": "integer", "minimum": 0, "description": "First entry, 0-based."},
            "limit": {"type": "integer", "minimum": 0, "description": "Entries at most."},
            "token": TOKEN,
        },
        required=["session_id"],
    ),
    "stop": _function(
        "stop",
        "Stop a session: shut its kernel down and delete its working folder. Returns nothing.",
        {"session_id": SESSION_ID, "token": TOKEN},
        required=["session_id"],
    ),
    "interrupt": _function(
        "interrupt",
        "Interrupt the cell running in a session (like Ctrl+C); the session stays usable.",
        {"session_id": SESSION_ID, "token": TOKEN},
        required=["session_id"],
    ),
    "restart": _function(
        "restart",
        "Restart a session's kernel: all variables are lost, the environment and working "
        "folder stay.",
        {"session_id": SESSION_ID, "token": TOKEN},
        required=["session_id"],
    ),
    "list_sessions": _function(
        "list_sessions",
        "List your workspace's sessions on this worker, each with session_id, status "
        "(starting, ready, busy, failed), app_id, created_at and executions.",
        {"token": TOKEN},
    ),
    "get_session_info": _function(
        "get_session_info",
        "Details of one session: status, error if it failed, environment, executions.",
        {"session_id": SESSION_ID, "token": TOKEN},
        required=["session_id"],
    ),
    "get_status": _function(
        "get_status",
        "How this worker is doing: which isolation its sessions get (sandbox or not, and "
        "what that guarantees), how many sessions run (in all and yours) against its "
        "limits, and how many warm kernels wait per environment.",
        {"token": TOKEN},
    ),
    "list_environments": _function(
        "list_environments",
        "The worker's cached conda environments: key, packages and channels (credentials "
        "redacted), size, when built and last used, whether in use. For the worker's "
        "administrators only.",
        {"token": TOKEN},
    ),
    "get_load": _function(
        "get_load",
        "How busy this worker is, as one number (lower is less busy): 1 per live session, "
        "1 more per session still starting, 1 per running cell, plus the share of memory "
        "in use. Hypha's app controller calls it with "
        "worker_selection_mode='select:min:get_load' to place apps.",
        {"token": TOKEN},
    ),
    "compile": _function(
        "compile",
        "Check an app's manifest when Hypha's app controller installs it; returns the "
        "manifest (with defaults filled in) and the files. Agents do not need it.",
        {
            "manifest": {"type": "object", "description": "The app's manifest."},
            "files": {"type": "array", "description": "The app's files.", "items": {}},
            "config": {"type": "object", "description": "Installation details."},
        },
        required=["manifest", "files"],
    ),
    "shutdown": _function(
        "shutdown",
        "Stop every session on this worker. Only the Hypha server itself may call it.",
        {},
    ),
}


def apply_schemas(
    service: dict[str, Any],
    wrap: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]],
) -> dict[str, Any]:
    """The service with each method wrapped by ``wrap`` and carrying its schema."""
    methods = [name for name, value in service.items() if callable(value)]
    missing = sorted(set(methods) - set(SCHEMAS))
    if missing:
        raise RuntimeError(f"Service methods without a schema: {missing}")
    result = dict(service)
    for name in methods:
        function = wrap(service[name])
        function.__schema__ = dict(SCHEMAS[name])
        result[name] = function
    return result
