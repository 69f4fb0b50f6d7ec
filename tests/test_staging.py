"""files_to_stage: an app's files and folders are copied into the session folder before
its entry point runs, and nothing an app or a listing names can land outside it.

The rule parser is tested directly. Staging is tested end to end through the real Hypha
server, artifact manager and S3 store, and, for listings the artifact manager would
never produce (``../escape.txt``, ``/abs.txt``), against a small real HTTP server on
127.0.0.1 that serves hostile listings to ``stage_files``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from hypha_conda_plugin import staging
from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.errors import CondaWorkerError, ManifestError, StagingError
from hypha_conda_plugin.stage_rules import StageRule, parse_stage_rules
from hypha_conda_plugin.staging import stage_files

# ----------------------------------------------------------------------------- parsing


def test_accepts_the_four_documented_forms() -> None:
    rules = parse_stage_rules(
        ["data.csv", "models/", "source.txt:renamed.txt", "raw_data/:processed_data/"]
    )
    assert rules == [
        StageRule("data.csv", "data.csv", is_dir=False),
        StageRule("models", "models", is_dir=True),
        StageRule("source.txt", "renamed.txt", is_dir=False),
        StageRule("raw_data", "processed_data", is_dir=True),
    ]


def test_accepts_nested_paths_and_no_rules() -> None:
    assert parse_stage_rules(["a/b/c.txt:x/y.txt", "deep/er/:flat/"]) == [
        StageRule("a/b/c.txt", "x/y.txt", is_dir=False),
        StageRule("deep/er", "flat", is_dir=True),
    ]
    assert parse_stage_rules(None) == []
    assert parse_stage_rules([]) == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("data.csv", "must be a list"),
        ({"data.csv": "x"}, "must be a list"),
        ([42], "must be strings"),
        ([None], "must be strings"),
        ([""], "empty entry"),
        (["   "], "empty entry"),
        (["/etc/passwd"], "absolute"),
        (["data.csv:/tmp/x.csv"], "absolute"),
        (["/models/"], "absolute"),
        (["../secret.txt"], r"'\.\.' is not allowed"),
        (["a/../../b.txt"], r"'\.\.' is not allowed"),
        (["data.csv:../out.csv"], r"'\.\.' is not allowed"),
        (["models/:../up/"], r"'\.\.' is not allowed"),
        (["..:x"], r"'\.\.' is not allowed"),
        (["models\\w.bin"], "backslash"),
        (["data.csv:out\\x.csv"], "backslash"),
        (["data\0.csv"], "NUL"),
        (["a.txt:folder/"], "renames a file to a folder"),
        (["folder/:a.txt"], "renames a folder to a file"),
        (["a:b:c"], "more than one ':'"),
        (["C:\\data.csv"], "backslash"),
        (["data.csv:"], "one side of ':' is empty"),
        ([":data.csv"], "one side of ':' is empty"),
        (["a//b.txt"], "empty or '.' part"),
        (["./data.csv"], "empty or '.' part"),
        (["models//"], "empty or '.' part"),
        (["/"], "absolute"),
    ],
)
def test_rejects_bad_entries_with_a_message_naming_them(raw: object, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        parse_stage_rules(raw)
    if isinstance(raw, list) and isinstance(raw[0], str) and raw[0].strip():
        assert repr(raw[0]) in str(caught.value)


def test_staging_error_is_a_worker_error() -> None:
    assert issubclass(StagingError, CondaWorkerError)


# ----------------------------------------------------------------------------- local HTTP server

# path -> listing (folders, trailing slash) or bytes (files)
HOSTILE_FILES: dict[str, object] = {
    "dotdot/": [{"name": "../escape.txt", "type": "file"}],
    "absolute/": [{"name": "/abs.txt", "type": "file"}],
    "parent/": [{"name": "..", "type": "directory"}],
    "nested/": [{"name": "ok.txt", "type": "file"}, {"name": "sub", "type": "directory"}],
    "nested/sub/": [{"name": "../../../escape.txt", "type": "file"}],
    "plain/": [{"name": "x.txt", "type": "file"}],
    "plain/x.txt": b"pwned",
    "nested/ok.txt": b"ok",
    "data.csv": b"a,b\n1,2\n",
    "big.bin": bytes(range(256)) * 4096 * 3,  # 3 MB, many chunks
    "paged/": [{"name": f"f{i}.txt", "type": "file"} for i in range(5)],
    **{f"paged/f{i}.txt": f"file {i}".encode() for i in range(5)},
}


@pytest.fixture
async def files_server() -> AsyncIterator[dict]:
    """An HTTP server on 127.0.0.1 that speaks Hypha's file API shape (listing with a
    trailing slash, download without), with the listings given in HOSTILE_FILES."""
    requests: list[tuple[str, str | None]] = []

    async def handle(request: web.Request) -> web.Response:
        path = request.match_info["path"]
        requests.append((path, request.headers.get("Authorization")))
        entry = HOSTILE_FILES.get(path)
        if entry is None:
            return web.Response(status=404, text="File or directory not found")
        if isinstance(entry, bytes):
            return web.Response(body=entry)
        offset = int(request.query.get("offset", 0))
        limit = int(request.query.get("limit", 1000))
        page = entry[offset : offset + limit]
        if not page:  # as Hypha does for an empty page
            return web.Response(status=404, text="File or directory not found")
        return web.Response(text=json.dumps(page), content_type="application/json")

    app = web.Application()
    app.router.add_get("/ws/artifacts/app/files/{path:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield {"base": f"http://127.0.0.1:{port}/ws/artifacts/app/files", "requests": requests}
    finally:
        await runner.cleanup()


async def _quiet(_: dict) -> None:
    return None


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("folder", ["dotdot", "absolute", "parent", "nested"])
async def test_hostile_listing_cannot_write_outside_the_session_folder(
    files_server: dict, tmp_path: Path, folder: str
) -> None:
    outer = tmp_path / "outer"
    dest = outer / "session"
    dest.mkdir(parents=True)
    with pytest.raises(StagingError, match=r"unsafe entry|outside the session folder"):
        await stage_files(
            [StageRule(folder, folder, is_dir=True)],
            dest=dest,
            files=AppFiles(files_server["base"], token=None),
            progress=_quiet,
        )
    assert _tree(outer) == {"session"}
    assert not Path("/abs.txt").exists()
    # Refused before any download started, not after half of the folder was written.
    assert all(path.endswith("/") for path, _ in files_server["requests"])


async def test_a_symlink_in_the_session_folder_is_not_followed(
    files_server: dict, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "session"
    dest.mkdir()
    (dest / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StagingError, match="outside the session folder"):
        await stage_files(
            [StageRule("plain", "link", is_dir=True)],
            dest=dest,
            files=AppFiles(files_server["base"], token=None),
            progress=_quiet,
        )
    assert list(outside.iterdir()) == []


async def test_stage_files_streams_files_sends_the_token_and_reports_progress(
    files_server: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a stand-in: a smaller page size so 5 real files exercise the paging code.
    monkeypatch.setattr(staging, "LISTING_PAGE", 2)
    messages: list[dict] = []

    async def progress(message: dict) -> None:
        messages.append(message)

    report = await stage_files(
        parse_stage_rules(["data.csv:in/table.csv", "big.bin", "paged/:pages/"]),
        dest=tmp_path,
        files=AppFiles(files_server["base"] + "/", token="secret-token"),
        progress=progress,
    )
    assert (tmp_path / "in" / "table.csv").read_bytes() == HOSTILE_FILES["data.csv"]
    assert (tmp_path / "big.bin").read_bytes() == HOSTILE_FILES["big.bin"]
    for i in range(5):
        assert (tmp_path / "pages" / f"f{i}.txt").read_text() == f"file {i}"
    assert report.files == 7
    assert report.bytes == sum(
        len(v) for k, v in HOSTILE_FILES.items() if k in ("data.csv", "big.bin")
    ) + sum(len(f"file {i}") for i in range(5))
    assert not [p for p in tmp_path.rglob("*.part")]
    assert {auth for _, auth in files_server["requests"]} == {"Bearer secret-token"}
    assert all(m["stage"] == "staging" and 0 <= m["progress"] <= 1 for m in messages)
    assert messages[-1]["type"] == "success" and messages[-1]["progress"] == 1.0
    assert any("pages/f3.txt" in m["message"] for m in messages)


async def test_missing_file_names_it(files_server: dict, tmp_path: Path) -> None:
    with pytest.raises(StagingError, match=r"'nope\.csv'.*add it to the app's files"):
        await stage_files(
            parse_stage_rules(["nope.csv"]),
            dest=tmp_path,
            files=AppFiles(files_server["base"], token=None),
            progress=_quiet,
        )
    with pytest.raises(StagingError, match=r"'nothere/'.*add it to the app's files"):
        await stage_files(
            parse_stage_rules(["nothere/"]),
            dest=tmp_path,
            files=AppFiles(files_server["base"], token=None),
            progress=_quiet,
        )
    assert _tree(tmp_path) == set()


# ----------------------------------------------------------------------------- end to end

APP_MAIN = """
with open("data.csv") as f:
    SEEN_AT_START = f.read()
"""

APP_FILES = {
    "main.py": APP_MAIN,
    "data.csv": "x,y\n1,2\n",
    "source.txt": "renamed content",
    "models/weights.txt": "w=1",
    "models/sub/deeper.txt": "deep w=2",
    "raw_data/a.txt": "raw a",
    "raw_data/nested/b.txt": "raw b",
    "unstaged.txt": "should not be copied",
}

EXPECTED = {
    "data.csv": "x,y\n1,2\n",
    "renamed.txt": "renamed content",
    "models/weights.txt": "w=1",
    "models/sub/deeper.txt": "deep w=2",
    "processed_data/a.txt": "raw a",
    "processed_data/nested/b.txt": "raw b",
}

READ_TREE = """
import json, os
tree = {}
for folder, _, names in os.walk("."):
    for name in names:
        path = os.path.relpath(os.path.join(folder, name), ".")
        with open(path) as f:
            tree[path] = f.read()
print(json.dumps(tree))
"""


def _manifest(files_to_stage: list) -> dict:
    return {
        "name": "Stager",
        "type": "conda-jupyter-kernel",
        "version": "0.1.0",
        "entry_point": "main.py",
        "dependencies": ["python"],
        "channels": ["conda-forge"],
        "files_to_stage": files_to_stage,
    }


async def _install(controller, app_id: str, files_to_stage: list) -> dict:
    return await controller.install(
        manifest=_manifest(files_to_stage),
        files=[{"name": n, "content": c, "format": "text"} for n, c in APP_FILES.items()],
        app_id=app_id,
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )


def _session_folders(worker_dirs: dict[str, Path]) -> set[str]:
    root = worker_dirs["working"]
    if not root.exists():
        return set()
    return {str(p.relative_to(root)) for p in root.glob("*/*") if ".runtime" not in p.parts}


async def test_app_files_and_folders_are_staged_before_the_entry_point(
    client, conda_worker, worker_dirs
):
    controller = await client.get_service("public/server-apps")
    app = await _install(
        controller,
        "stager",
        ["data.csv", "source.txt:renamed.txt", "models/", "raw_data/:processed_data/"],
    )
    session = await controller.start(app["id"], wait_for_service=False, stage=True, timeout=120)
    try:
        # The entry point already saw the staged file when it ran.
        seen = await conda_worker.execute(session["id"], "print(SEEN_AT_START, end='')")
        assert seen["outputs"][0]["text"] == EXPECTED["data.csv"]
        result = await conda_worker.execute(session["id"], READ_TREE)
        assert result["status"] == "ok", result
        assert json.loads(result["outputs"][0]["text"]) == EXPECTED
        logs = await conda_worker.get_logs(session["id"], type="progress")
        assert any("Staged 6 file(s)" in item["content"] for item in logs["items"])
        workdir = Path((await conda_worker.get_session_info(session["id"]))["working_dir"])
        assert str(workdir.parent.relative_to(worker_dirs["working"])) in _session_folders(
            worker_dirs
        )
        assert not list(workdir.rglob("*.part")) and not (workdir / "unstaged.txt").exists()
    finally:
        await controller.stop(session["id"])
    assert not workdir.exists()


async def test_missing_staged_file_fails_the_start_naming_it(client, conda_worker, worker_dirs):
    controller = await client.get_service("public/server-apps")
    app = await _install(controller, "stager-missing", ["data.csv", "not_in_app.csv"])
    with pytest.raises(Exception, match=r"not_in_app\.csv.*add it to the app's files"):
        await controller.start(app["id"], wait_for_service=False, stage=True, timeout=120)
    failed = [s for s in await conda_worker.list_sessions() if s["app_id"] == "stager-missing"]
    assert failed and all(s["status"] == "failed" for s in failed)
    assert all("not_in_app.csv" in s["error"] for s in failed)
    # The failed start's folder (staged data.csv included) is gone.
    assert all(s["working_dir"] and not Path(s["working_dir"]).exists() for s in failed)
    assert not any(Path(s["working_dir"]).exists() for s in failed)


async def test_bad_rules_are_refused_when_the_app_is_installed(client):
    controller = await client.get_service("public/server-apps")
    with pytest.raises(Exception, match=r"'\.\.' is not allowed"):
        await _install(controller, "stager-bad", ["../outside.txt"])


async def test_direct_start_with_files_to_stage_is_a_clear_error(conda_worker):
    manifest = {"dependencies": ["python"], "files_to_stage": ["data.csv"]}
    with pytest.raises(Exception, match="files_to_stage needs an app's files"):
        await conda_worker.start({"id": "direct-stage", "manifest": manifest})
    manifest["files_to_stage"] = ["data.csv:/etc/x"]
    with pytest.raises(Exception, match="absolute"):
        await conda_worker.start({"id": "direct-stage", "manifest": manifest})
