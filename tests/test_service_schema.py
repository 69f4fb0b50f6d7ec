"""The service's schemas (what Hypha's MCP endpoint lists) match the methods they
describe, and calls through Hypha's shared MCP/HTTP identity must name their caller."""

from __future__ import annotations

import inspect

import pytest

from hypha_conda_plugin.errors import InvalidTokenError
from hypha_conda_plugin.service_schema import SCHEMAS, apply_schemas
from hypha_conda_plugin.settings import Settings
from hypha_conda_plugin.shared_identity import caller_context, is_shared_adapter
from hypha_conda_plugin.tokens import TokenVerifier
from hypha_conda_plugin.worker import CondaWorker

CALLBACKS = {"progress_callback", "output_callback", "context"}


@pytest.fixture
def worker(tmp_path) -> CondaWorker:
    return CondaWorker(Settings(cache_dir=tmp_path / "c", working_dir=tmp_path / "w"))


def test_every_method_has_a_schema_that_matches_its_signature(worker):
    service = worker.service_definition()
    methods = {name for name, value in service.items() if callable(value)}
    assert methods == set(SCHEMAS)
    for name in methods:
        schema = service[name].__schema__
        assert schema["name"] == name and len(schema["description"]) > 40
        parameters = inspect.signature(getattr(worker, name)).parameters
        properties = schema["parameters"]["properties"]
        assert not CALLBACKS & set(properties), f"{name}: callbacks are not for JSON callers"
        for field in properties:
            assert field == "token" or field in parameters, f"{name}: no parameter {field}"
        for field in schema["parameters"]["required"]:
            assert parameters[field].default is inspect.Parameter.empty, (name, field)
        for field, parameter in parameters.items():
            if parameter.default is inspect.Parameter.empty and field != "self":
                assert field in schema["parameters"]["required"], (name, field)


def test_a_method_without_a_schema_stops_registration(worker):
    async def secret(context=None):
        return None

    with pytest.raises(RuntimeError, match="without a schema: \\['secret'\\]"):
        apply_schemas({"secret": secret}, lambda method: method)


def test_hyphas_adapter_clients_are_recognised():
    assert is_shared_adapter({"from": "ws-a/client-P6z78vUNyQK9L26vmzJoS2"})
    assert not is_shared_adapter({"from": "ws-a/UZHdGPvokHDea6Vzr4789V"})  # a websocket client
    assert not is_shared_adapter({"from": "public/lateral-fifth-26675248"})  # the server
    assert not is_shared_adapter(None)


async def test_an_adapter_call_without_a_token_is_refused_and_others_pass():
    verifier = TokenVerifier("http://127.0.0.1:9")  # never asked in these cases
    adapter = {"ws": "public", "from": "public/client-abc", "user": {"id": "first-caller"}}
    with pytest.raises(InvalidTokenError, match="Pass your own Hypha token"):
        await caller_context(adapter, None, verifier)
    websocket = {"ws": "ws-a", "from": "ws-a/abc", "user": {"id": "alice"}}
    assert await caller_context(websocket, None, verifier) == websocket
    assert await caller_context(None, None, verifier) is None


async def test_a_token_the_server_cannot_check_is_refused():
    verifier = TokenVerifier("http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(InvalidTokenError, match="Could not check the token"):
        await verifier.verify("some-token")
    with pytest.raises(InvalidTokenError, match="non-empty string"):
        await verifier.verify("")
