"""The worker as MCP tools, through Hypha's own MCP endpoint (`--enable-mcp`).

An agent that speaks only MCP (the `mcp` package's client over streamable HTTP) lists
the tools, starts a session, runs a cell, reads the logs and stops it. Hypha's MCP
adapter calls the worker with one identity shared by every caller of the endpoint, so
each agent names itself with its own token, and sessions belong to the agent's own
workspace: another agent cannot see or use them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from hypha_rpc import connect_to_server
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

from hypha_conda_plugin.local_server import LocalServer
from hypha_conda_plugin.service_schema import SCHEMAS

AGENT_TOOLS = {"start", "execute", "get_logs", "stop", "list_sessions", "get_session_info"}


@pytest.fixture(scope="module")
async def mcp_server(session_tmp: Path, offline_channel, worker_dirs) -> AsyncIterator[LocalServer]:
    server = LocalServer(
        session_tmp / "mcp-server",
        s3=False,
        server_apps=False,
        mcp=True,
        plugin_env={
            "CONDA_CHANNEL_ALIAS": offline_channel.alias_url,
            "CONDA_CACHE_DIR": str(worker_dirs["cache"]),
            "CONDA_WORKING_DIR": str(session_tmp / "mcp-sessions"),
        },
    )
    async with server:
        yield server


@contextlib.asynccontextmanager
async def mcp_session(server: LocalServer, token: str | None) -> AsyncIterator[ClientSession]:
    url = f"{server.url}/public/mcp/conda-worker/mcp"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(60, read=300))
    async with http, streamable_http_client(url, http_client=http) as (read, write, _):
        async with ClientSession(read, write, read_timeout_seconds=timedelta(minutes=5)) as s:
            await s.initialize()
            yield s


def text(result) -> str:
    return "".join(getattr(item, "text", "") for item in result.content)


async def test_tools_carry_schemas_for_agents_and_no_callbacks(mcp_server):
    token = await mcp_server.user_token("agent-a")
    async with mcp_session(mcp_server, token) as agent:
        tools = {tool.name: tool for tool in (await agent.list_tools()).tools}
    assert AGENT_TOOLS <= set(tools), sorted(tools)
    assert set(tools) == set(SCHEMAS), "every public method is a tool"
    for name, tool in tools.items():
        assert len(tool.description) > 40, name
        properties = tool.inputSchema["properties"]
        assert not {"progress_callback", "output_callback", "context"} & set(properties), name
        for field, schema in properties.items():
            assert schema.get("description") or field in ("config", "manifest"), (name, field)
    assert tools["execute"].inputSchema["required"] == ["session_id", "script"]
    assert "manifest" in tools["start"].inputSchema["properties"]["config"]["properties"]


async def test_an_agent_runs_a_session_through_mcp_alone(mcp_server):
    token_a = await mcp_server.user_token("agent-a")
    token_b = await mcp_server.user_token("agent-b")
    async with mcp_session(mcp_server, token_a) as agent:
        # Without its token the worker cannot know whose call this is: refused.
        anonymous = await agent.call_tool("list_sessions", {})
        assert anonymous.isError and "Pass your own Hypha token" in text(anonymous)

        started = await agent.call_tool(
            "start",
            {
                "config": {"id": "mcp-session", "manifest": {"dependencies": ["python"]}},
                "token": token_a,
            },
        )
        assert not started.isError, text(started)
        session_id = json.loads(text(started))
        assert session_id == "mcp-session"

        ran = await agent.call_tool(
            "execute", {"session_id": session_id, "script": "print(6*7)", "token": token_a}
        )
        assert not ran.isError, text(ran)
        result = json.loads(text(ran))  # results come back as JSON text
        assert result["status"] == "ok"
        assert result["outputs"] == [{"type": "stream", "name": "stdout", "text": "42\n"}]
        logs = await agent.call_tool(
            "get_logs", {"session_id": session_id, "type": "stdout", "token": token_a}
        )
        assert not logs.isError, text(logs)
        assert [item["content"] for item in json.loads(text(logs))["items"]] == ["42\n"]

        # The session belongs to agent A's own workspace ...
        api_a = await connect_to_server(
            {"server_url": mcp_server.url, "workspace": "agent-a", "token": token_a}
        )
        try:
            worker = await api_a.get_service("public/conda-worker")
            assert [s["session_id"] for s in await worker.list_sessions()] == [session_id]
        finally:
            await api_a.disconnect()

    # ... so agent B, over the same endpoint, neither sees nor uses it.
    async with mcp_session(mcp_server, token_b) as other:
        listed = await other.call_tool("list_sessions", {"token": token_b})
        assert json.loads(text(listed)) == []
        stolen = await other.call_tool(
            "execute", {"session_id": session_id, "script": "print('hi')", "token": token_b}
        )
        assert stolen.isError and "No session" in text(stolen)
        forged = await other.call_tool("list_sessions", {"token": token_a[:-4] + "AAAA"})
        assert forged.isError and "refused the token" in text(forged)

    async with mcp_session(mcp_server, token_a) as agent:
        stopped = await agent.call_tool("stop", {"session_id": session_id, "token": token_a})
        assert not stopped.isError, text(stopped)
        remaining = await agent.call_tool("list_sessions", {"token": token_a})
        assert json.loads(text(remaining)) == []
