"""Calls that reach the worker through Hypha's MCP and HTTP adapters.

Hypha 0.21.137 serves a service as MCP tools at ``/{workspace}/mcp/{service_id}/mcp``
through an adapter it builds once per service and then caches: the adapter's Hypha
connection is opened with the identity of whoever called the endpoint first, and every
later caller, whatever their token, reaches the service with that first identity
(seen by the worker as ``ws`` = the URL's workspace, ``user`` = the first caller,
``from`` = ``<workspace>/client-<random>``). Left alone, every agent using the endpoint
would share one owner, and so each other's sessions. Hypha's HTTP adapter
(``/{workspace}/services/...``) reaches the worker from the same kind of client.

So a call from such an adapter client must say who is calling: the caller's own Hypha
token in ``token`` (the one an MCP client sends as its Bearer token). The worker checks
it with its own Hypha server (``tokens.TokenVerifier``) and acts for the token's user
and workspace: sessions started over MCP belong to the agent's own workspace, exactly as
if it had connected with that token. Any caller may pass ``token`` the same way. A call
from an adapter without one is refused with a message that says so.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from hypha_conda_plugin.errors import InvalidTokenError
from hypha_conda_plugin.tokens import TokenVerifier

#: Client ids Hypha gives the connections it opens on a caller's behalf
#: (``get_workspace_interface`` without a client id): the MCP and HTTP adapters.
ADAPTER_CLIENT_PREFIX = "client-"
#: Context fields that route a call; kept when the caller's identity is replaced.
ROUTING_FIELDS = ("from", "to", "method", "type", "session", "connection_type")


def is_shared_adapter(context: Mapping[str, Any] | None) -> bool:
    """Whether a call comes from one of Hypha's MCP/HTTP adapter connections."""
    source = str((context or {}).get("from") or "")
    return source.partition("/")[2].startswith(ADAPTER_CLIENT_PREFIX)


async def caller_context(
    context: Mapping[str, Any] | None, token: object, verifier: TokenVerifier
) -> dict[str, Any] | None:
    """The context the worker acts on: the token's user if a token is given, else the
    context Hypha attached (refused when it is an adapter's shared identity)."""
    if token is not None:
        user = await verifier.verify(token)
        routing = {k: v for k, v in (context or {}).items() if k in ROUTING_FIELDS}
        return user.context(routing)
    if is_shared_adapter(context):
        raise InvalidTokenError(
            "This call came through Hypha's MCP or HTTP endpoint, which calls the worker "
            "with one identity shared by all of its callers, so the worker cannot tell "
            "whose sessions these are. Pass your own Hypha token as 'token' (the token "
            "your MCP client sends as its Bearer token); your sessions then belong to its "
            "workspace."
        )
    return dict(context) if context is not None else None


def with_caller_identity(
    method: Callable[..., Awaitable[Any]], verifier: TokenVerifier
) -> Callable[..., Awaitable[Any]]:
    """``method`` taking an optional ``token`` that names the caller (see module doc)."""

    @functools.wraps(method)
    async def call(*args: Any, token: object = None, context: Any = None, **kwargs: Any) -> Any:
        resolved = await caller_context(context, token, verifier)
        result = await method(*args, context=resolved, **kwargs)
        if is_shared_adapter(context):
            return json.dumps(result, default=str)
        return result

    return call
