"""A hostile tenant, tried for real: code in workspace B's kernel goes after the server,
workspace A's session and the shared environment, through a real Hypha server.

The suite runs twice: with the bubblewrap sandbox (``CONDA_SANDBOX=bwrap``) and without
it (``CONDA_SANDBOX=off``). Guarantees that only the sandbox gives are marked
``sandbox_only``: without the sandbox they are expected to fail (strict xfail, so the
report lists exactly which guarantees do not hold in that mode, and a guarantee that
starts holding there is noticed). These machines run sessions as root, the worst case
for the unsandboxed mode: a non-root worker keeps a few more of them (see README).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from hypha_conda_plugin.local_server import LocalServer
from hypha_conda_plugin.sandbox import detect_sandbox
from tests.conftest import _connect, worker_server

pytestmark = pytest.mark.timeout(300)

MANIFEST = {"dependencies": ["python"], "channels": ["conda-forge"]}
CANARY = "canary-" + secrets.token_hex(8)


def _stdout(result: dict) -> str:
    return "".join(
        o["text"] for o in result["outputs"] if o["type"] == "stream" and o["name"] == "stdout"
    )


@pytest.fixture(scope="module", params=["bwrap", "off"])
async def tenants(request, offline_channel, tmp_path_factory) -> AsyncIterator[dict]:
    """A server in the given sandbox mode; A and B are users of two workspaces."""
    mode = request.param
    if mode == "bwrap" and not (await detect_sandbox("auto")).enabled:
        pytest.skip("bubblewrap cannot create user namespaces on this machine")
    folder = tmp_path_factory.mktemp(f"isolation-{mode}")
    # With S3 and server apps, like a production server (their secrets in its process).
    server = worker_server(
        folder, offline_channel, s3=True, CONDA_SANDBOX=mode, HYPHA_TEST_CANARY=CANARY
    )
    async with server:
        alice = await _connect(server, "ws-alice")
        bob = await _connect(server, "ws-bob")
        a = await alice.get_service("public/conda-worker")
        b = await bob.get_service("public/conda-worker")
        a_session = await a.start({"id": "a-main", "manifest": MANIFEST})
        b_session = await b.start({"id": "b-main", "manifest": MANIFEST})
        yield {
            "mode": mode,
            "server": server,
            "a": a,
            "b": b,
            "a_session": a_session,
            "b_session": b_session,
            "working_dir": folder / "sessions",
            "cache_dir": folder / "cache",
        }
        for worker, session in ((a, a_session), (b, b_session)):
            try:
                await worker.stop(session)
            except Exception:
                pass
        await alice.disconnect()
        await bob.disconnect()


@pytest.fixture
def sandbox_only(request, tenants):
    """Mark a guarantee that holds only inside the sandbox: strict xfail without it."""
    if tenants["mode"] == "off":
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="holds only with the bubblewrap sandbox")
        )


async def _run(tenants: dict, who: str, code: str) -> dict:
    worker, session = tenants[who], tenants[f"{who}_session"]
    return await worker.execute(session, code, config={"timeout": 120})


def _server_pid(server: LocalServer) -> int:
    return server._processes[-1][0].pid


# ---------------------------------------------------------------- the server's secrets


async def test_no_process_readable_from_a_kernel_holds_the_servers_secrets(tenants, sandbox_only):
    server: LocalServer = tenants["server"]
    code = f"""
import os
found = []
for pid in os.listdir('/proc'):
    if not pid.isdigit():
        continue
    for part in ('environ', 'cmdline'):
        try:
            data = open(f'/proc/{{pid}}/{{part}}', 'rb').read()
        except OSError:
            continue
        if {CANARY.encode()!r} in data or {server.root_token.encode()!r} in data:
            found.append((pid, part))
print(found)
"""
    result = await _run(tenants, "b", code)
    assert result["status"] == "ok", result
    assert _stdout(result).strip() == "[]"


async def test_a_kernel_cannot_signal_the_server(tenants, sandbox_only):
    pid = _server_pid(tenants["server"])
    result = await _run(
        tenants,
        "b",
        f"import os\ntry:\n    os.kill({pid}, 0)\n    print('reached')\n"
        "except OSError as e:\n    print(type(e).__name__)",
    )
    assert _stdout(result).strip() in ("ProcessLookupError", "PermissionError")


async def test_the_kernel_environment_has_no_server_variables(tenants):
    result = await _run(tenants, "b", "import os; print(sorted(os.environ))")
    names = set(json.loads(_stdout(result).replace("'", '"')))
    assert "HYPHA_TEST_CANARY" not in names
    assert not {n for n in names if n.startswith(("AWS_", "S3_", "JWT", "PYTHONPATH"))}


# ------------------------------------------------------------------ other sessions


async def test_another_workspaces_session_folder_and_kernel_files_are_out_of_reach(
    tenants, sandbox_only
):
    info = await tenants["a"].get_session_info(tenants["a_session"])
    a_work = Path(info["working_dir"])
    connection = a_work.parent / "k" / "connection.json"
    assert connection.exists()  # the host sees it; B must not
    a_instance = a_work.parent.name
    code = f"""
import os
reached = []
for path in ({str(a_work)!r}, {str(connection)!r}):
    try:
        reached.append((path, os.listdir(path) if os.path.isdir(path) else open(path).read(9)))
    except OSError:
        pass
# The working root exists in B's view only as the path to its own instance folder.
for folder, dirs, files in os.walk({str(tenants["working_dir"])!r}):
    if {a_instance!r} in dirs + files:
        reached.append((folder, 'lists A'))
print(reached)
"""
    result = await _run(tenants, "b", code)
    assert result["status"] == "ok", result
    assert _stdout(result).strip() == "[]"


async def test_an_ipython_startup_file_does_not_reach_the_next_session_of_another_tenant(
    tenants,
):
    marker = "startup-" + secrets.token_hex(4)
    code = f"""
import os, pathlib
folder = pathlib.Path(os.path.expanduser('~/.ipython/profile_default/startup'))
folder.mkdir(parents=True, exist_ok=True)
(folder / 'zz_evil.py').write_text("import os; os.environ['HCP_PWNED'] = {marker!r}")
print(folder)
"""
    written = await _run(tenants, "b", code)
    assert written["status"] == "ok", written
    a, session = tenants["a"], None
    try:
        session = await a.start({"id": "a-after-startup-file", "manifest": MANIFEST})
        result = await a.execute(session, "import os; print(os.environ.get('HCP_PWNED'))")
        assert _stdout(result).strip() == "None"
    finally:
        if session:
            await a.stop(session)


# ------------------------------------------------------------- the shared environment


async def test_the_environment_and_cache_are_read_only_for_kernels(tenants, sandbox_only):
    cache = tenants["cache_dir"]
    info = await tenants["b"].get_session_info(tenants["b_session"])
    code = f"""
import sysconfig
for path in (sysconfig.get_paths()['purelib'] + '/hcp_evil.py', {str(cache)!r} + '/envs/hcp_x'):
    try:
        with open(path, 'w') as handle:
            handle.write("WHO = 'evil'\\n")
    except OSError as error:
        print('refused', path, error)
"""
    await _run(tenants, "b", code)
    # What counts is the host: inside the sandbox, paths under /tmp are B's private tmp.
    planted = [
        path
        for path in (
            cache / "envs" / "hcp_x",
            *Path(info["environment"]).glob("lib/*/site-packages/hcp_evil.py"),
        )
        if path.exists()
    ]
    assert planted == []
    imported = await _run(
        tenants, "a", "import importlib.util as u; print(u.find_spec('hcp_evil'))"
    )
    assert _stdout(imported).strip() == "None"


WHEEL_CELL = """
import base64, hashlib, zipfile
name, version = 'hcp_probe', '1.0'
files = {
    f'{name}/__init__.py': "WHO = 'bob'\\n",
    f'{name}-{version}.dist-info/METADATA':
        f'Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n',
    f'{name}-{version}.dist-info/WHEEL':
        'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n',
}
def digest(text):
    raw = hashlib.sha256(text.encode()).digest()
    return 'sha256=' + base64.urlsafe_b64encode(raw).rstrip(b'=').decode()
record = ''.join(f'{path},{digest(body)},{len(body.encode())}\\n' for path, body in files.items())
record += f'{name}-{version}.dist-info/RECORD,,\\n'
wheel = f'{name}-{version}-py3-none-any.whl'
with zipfile.ZipFile(wheel, 'w') as archive:
    for path, body in files.items():
        archive.writestr(path, body)
    archive.writestr(f'{name}-{version}.dist-info/RECORD', record)
print(wheel)
"""


async def test_pip_install_in_a_session_is_private_to_it(tenants):
    made = await _run(tenants, "b", WHEEL_CELL)
    assert made["status"] == "ok", made
    wheel = _stdout(made).strip()
    installed = await _run(
        tenants, "b", f"%pip install --no-index --no-deps --no-cache-dir ./{wheel}"
    )
    assert installed["status"] == "ok", installed
    used = await _run(tenants, "b", "import hcp_probe; print(hcp_probe.WHO)")
    assert _stdout(used).strip() == "bob", used
    # Same environment, other tenant: not there, now or in a new session.
    other = await _run(tenants, "a", "import importlib.util as u; print(u.find_spec('hcp_probe'))")
    assert _stdout(other).strip() == "None"
    info_a = await tenants["a"].get_session_info(tenants["a_session"])
    info_b = await tenants["b"].get_session_info(tenants["b_session"])
    assert info_a["environment"] == info_b["environment"]


# ------------------------------------------------------------------------ callers


async def test_anonymous_visitors_are_refused_with_a_way_to_sign_in(tenants):
    from hypha_rpc import connect_to_server

    visitor = await connect_to_server({"server_url": tenants["server"].url})
    try:
        worker = await visitor.get_service("public/conda-worker")
        with pytest.raises(Exception, match="Sign in"):
            await worker.start({"manifest": MANIFEST})
    finally:
        await visitor.disconnect()


async def test_a_caller_cannot_make_the_worker_fetch_from_a_url_of_its_choice(tenants):
    requests: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.Response(text="print('fetched')")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        for key in ("app_files_base_url", "server_url"):
            with pytest.raises(Exception, match="only be set by the Hypha server"):
                await tenants["b"].start(
                    {
                        "id": f"fetch-{key}",
                        "manifest": {**MANIFEST, "entry_point": "main.py"},
                        "app_id": "x",
                        key: f"http://127.0.0.1:{port}/steal",
                    }
                )
        await asyncio.sleep(0.5)
        assert requests == []
    finally:
        await runner.cleanup()


async def test_session_info_says_which_isolation_it_has(tenants):
    info = await tenants["b"].get_session_info(tenants["b_session"])
    assert info["isolation"] == ("bwrap" if tenants["mode"] == "bwrap" else "none")
    assert os.path.isabs(info["working_dir"])
