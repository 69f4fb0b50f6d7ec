"""Folders staged through Hypha's zip endpoint, safely, within bounds, with a fallback.

Two kinds of server:

* The real Hypha server of the suite (artifact manager, moto S3): many files staged
  through ``create-zip-file`` (its access log proves a few zip requests, no request per
  file), renames, the bounds, the entry point's size limit, and the per-file fallback
  (behind a small forwarding proxy that answers 404 for ``create-zip-file`` the way a
  server without the endpoint does: the real server cannot be made to lack it).
  Most of the files are written straight into the artifact's S3 folder, where the
  artifact manager reads them: uploading each through ``put_file`` costs about a second
  per file on this server, and the reading side, which is what is tested, is the same.
* A local aiohttp server on 127.0.0.1 speaking the same HTTP API, for answers the real
  artifact manager never gives: zips with ``../`` or absolute names, symlink or device
  entries, sizes that lie, a zip bomb, an entry missing, endless listings.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import stat
import warnings
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from hypha_conda_plugin import staging, staging_zip
from hypha_conda_plugin.app_files import AppFiles
from hypha_conda_plugin.errors import AppFileError, StagingError
from hypha_conda_plugin.settings import Settings
from hypha_conda_plugin.stage_rules import parse_stage_rules
from hypha_conda_plugin.staging import stage_files
from hypha_conda_plugin.staging_limits import StagingLimits
from hypha_conda_plugin.staging_zip import Member, batches


async def _quiet(_: dict) -> None:
    return None


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ----------------------------------------------------------------------------- zips
def _zip(entries: list[tuple[str, bytes, int | None]], method: int = zipfile.ZIP_STORED) -> bytes:
    """A zip of (name, data, unix mode or None) entries, names kept exactly as given."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are the point of one test
        with zipfile.ZipFile(buffer, "w", method) as archive:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name)
                info.compress_type = method
                info.external_attr = (mode if mode is not None else stat.S_IFREG | 0o600) << 16
                archive.writestr(info, data)
    return buffer.getvalue()


def _declare_size(data: bytes, declared: int) -> bytes:
    """Rewrite the (single) entry's uncompressed size in the central directory."""
    at = data.rfind(b"PK\x01\x02") + 24
    return data[:at] + declared.to_bytes(4, "little") + data[at + 4 :]


FOLDER = [
    {"name": "f0.txt", "type": "file", "size": 2},
    {"name": "f1.txt", "type": "file", "size": 2},
]
GOOD = [("evil/f0.txt", b"f0", None), ("evil/f1.txt", b"f1", None)]
BOMB = b"\0" * (40 * 1024**2)

HOSTILE_ZIPS: dict[str, tuple[bytes, str]] = {
    "dotdot": (_zip([*GOOD, ("evil/../../escape.txt", b"x", None)]), r"a '\.\.' in its path"),
    "absolute": (_zip([GOOD[0], ("/tmp/hcp-abs-escape.txt", b"x", None)]), "absolute path"),
    "symlink": (
        _zip([GOOD[0], ("evil/f1.txt", b"/etc/passwd", stat.S_IFLNK | 0o777)]),
        "symbolic link",
    ),
    "device": (_zip([GOOD[0], ("evil/f1.txt", b"", stat.S_IFCHR | 0o600)]), "device"),
    "extra": (_zip([*GOOD, ("evil/other.txt", b"x", None)]), "not asked for"),
    "duplicate": (_zip([*GOOD, ("evil/f1.txt", b"again", None)]), "second entry"),
    "missing": (_zip([GOOD[0]]), r"'evil/f1\.txt' in files_to_stage is not among"),
    "size-lie": (_declare_size(_zip([GOOD[1], GOOD[0]]), 1), "corrupt"),
    "bomb": (
        _zip([GOOD[1], ("evil/f0.txt", BOMB, None)], zipfile.ZIP_DEFLATED),
        "CONDA_MAX_STAGED_BYTES",
    ),
    "bomb-lie": (
        _declare_size(_zip([GOOD[1], ("evil/f0.txt", BOMB, None)], zipfile.ZIP_DEFLATED), 2),
        "corrupt",
    ),
}


@pytest.fixture
async def zip_server() -> AsyncIterator[dict]:
    """Hypha's file API shape on 127.0.0.1 (listings, files, create-zip-file), serving
    ``state["zip"]`` as the zip and ``state["files"]`` as folders and files."""
    state: dict = {"zip": None, "zip_status": 200, "files": {}, "requests": []}

    async def files(request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        state["requests"].append(("file", path))
        entry = state["files"].get(path)
        if entry is None:
            return web.Response(status=404, text="File or directory not found")
        if isinstance(entry, bytes):
            return web.Response(body=entry)
        if callable(entry):
            return await entry(request)
        offset = int(request.query.get("offset", 0))
        limit = int(request.query.get("limit", 1000))
        page = entry[offset : offset + limit]
        if not page:
            return web.Response(status=404, text="File or directory not found")
        return web.Response(text=json.dumps(page), content_type="application/json")

    async def create_zip(request: web.Request) -> web.Response:
        state["requests"].append(("zip", request.query.getall("file", [])))
        if state["zip_status"] != 200:
            return web.json_response({"detail": "no zip here"}, status=state["zip_status"])
        return web.Response(body=state["zip"], content_type="application/zip")

    app = web.Application()
    app.router.add_get("/ws/artifacts/app/files/{path:.*}", files)
    app.router.add_get("/ws/artifacts/app/create-zip-file", create_zip)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    state["app_files"] = AppFiles(f"http://127.0.0.1:{port}/ws/artifacts/app/files")
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("case", sorted(HOSTILE_ZIPS))
async def test_a_hostile_zip_is_refused_and_nothing_is_written(
    zip_server: dict, tmp_path: Path, case: str
) -> None:
    data, message = HOSTILE_ZIPS[case]
    zip_server["files"] = {"evil/": FOLDER}
    zip_server["zip"] = data
    outer = tmp_path / "outer"
    dest = outer / "session"
    dest.mkdir(parents=True)
    with pytest.raises(StagingError, match=message) as caught:
        await stage_files(
            parse_stage_rules(["evil/"]),
            dest=dest,
            files=zip_server["app_files"],
            progress=_quiet,
            limits=StagingLimits(max_bytes=1024**2),
        )
    # Nothing beside the session folder, no temporary zip, no partial file. Entries are
    # all checked before the first is written; a lie found while extracting (only the
    # CRC tells) leaves earlier, verified files until the caller deletes the folder.
    left = _tree(outer)
    if case.endswith("lie"):
        assert (dest / "evil" / "f1.txt").read_bytes() == b"f1"
        left -= {"session/evil", "session/evil/f1.txt"}
    assert left == {"session"}, caught.value
    assert not Path("/tmp/hcp-abs-escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    # The zip was the only download: no fallback to per-file requests for unsafe zips.
    assert [kind for kind, _ in zip_server["requests"]] == ["file", "zip"]


async def test_folders_come_in_one_zip_with_renames_and_big_files_alone(
    zip_server: dict, tmp_path: Path
) -> None:
    many = {f"many/sub{i % 3}/f{i}.txt": f"file {i}".encode() for i in range(30)}
    big = bytes(range(256)) * 400  # over the member limit below: fetched on its own
    listing = {
        "many/": [{"name": f"sub{j}", "type": "directory"} for j in range(3)]
        + [{"name": "big.bin", "type": "file", "size": len(big)}],
        **{
            f"many/sub{j}/": [
                {"name": p.rsplit("/", 1)[1], "type": "file", "size": len(many[p])}
                for p in many
                if p.startswith(f"many/sub{j}/")
            ]
            for j in range(3)
        },
        "many/big.bin": big,
        "data.csv": b"a,b\n",
    }
    zip_server["files"] = listing
    zip_server["zip"] = _zip([(p, d, None) for p, d in many.items()])
    messages: list[dict] = []

    async def progress(message: dict) -> None:
        messages.append(message)

    report = await stage_files(
        parse_stage_rules(["many/:renamed/", "data.csv:in/table.csv"]),
        dest=tmp_path,
        files=zip_server["app_files"],
        progress=progress,
        zip_member_limit=10_000,
    )
    for path, data in many.items():
        assert (tmp_path / "renamed" / path.removeprefix("many/")).read_bytes() == data
    assert (tmp_path / "renamed" / "big.bin").read_bytes() == big
    assert (tmp_path / "in" / "table.csv").read_bytes() == b"a,b\n"
    assert report.files == 32
    assert report.bytes == sum(map(len, many.values())) + len(big) + 4
    zips = [files for kind, files in zip_server["requests"] if kind == "zip"]
    assert len(zips) == 1 and sorted(zips[0]) == sorted(many)
    downloads = [p for kind, p in zip_server["requests"] if kind == "file" and "." in p]
    assert sorted(downloads) == ["data.csv", "many/big.bin"]
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert any("from one zip [" in m["message"] for m in messages)


async def test_long_file_lists_are_cut_into_batches_by_url_length(
    zip_server: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a stand-in: a shorter URL limit so 40 files need several real requests.
    monkeypatch.setattr(staging_zip, "ZIP_URL_LIMIT", 400)
    names = [f"f{i:02d}.txt" for i in range(40)]
    app_files = zip_server["app_files"]
    members = [Member(f"d/{n}", f"d/{n}", 1) for n in names]
    groups = batches(members, app_files.zip_url)
    assert len(groups) > 2 and sum(map(len, groups)) == 40
    # Split further into at least `parts` zips to fetch side by side.
    assert [len(g) for g in batches(members[:12], app_files.zip_url, parts=4)] == [3, 3, 3, 3]
    async with app_files.client() as client:
        for group in groups:
            zip_server["zip"] = _zip([(m.source, b"x", None) for m in group])
            await staging_zip.stage_zip(
                client,
                app_files,
                group,
                tmp_path,
                staging.ByteBudget(StagingLimits()),
            )
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == names
    requested = [files for kind, files in zip_server["requests"] if kind == "zip"]
    assert requested == [[m.source for m in g] for g in groups]


async def test_an_older_server_without_the_zip_endpoint_gets_one_request_per_file(
    zip_server: dict, tmp_path: Path
) -> None:
    zip_server["files"] = {"evil/": FOLDER, "evil/f0.txt": b"f0", "evil/f1.txt": b"f1"}
    zip_server["zip_status"] = 404
    messages: list[dict] = []

    async def progress(message: dict) -> None:
        messages.append(message)

    await stage_files(
        parse_stage_rules(["evil/"]),
        dest=tmp_path,
        files=zip_server["app_files"],
        progress=progress,
    )
    assert (tmp_path / "evil" / "f0.txt").read_bytes() == b"f0"
    assert (tmp_path / "evil" / "f1.txt").read_bytes() == b"f1"
    kinds = [kind for kind, _ in zip_server["requests"]]
    assert kinds == ["file", "zip", "file", "file"]
    assert any(m["type"] == "warning" and "one by one" in m["message"] for m in messages)


async def test_a_file_gone_from_the_zip_is_named_through_the_fallback(
    zip_server: dict, tmp_path: Path
) -> None:
    # Hypha answers 500 without naming the file when one is missing; the per-file
    # path that follows gets a 404 for exactly that file.
    zip_server["files"] = {"evil/": FOLDER, "evil/f0.txt": b"f0"}
    zip_server["zip_status"] = 500
    with pytest.raises(StagingError, match=r"'evil/f1\.txt' in files_to_stage is not among"):
        await stage_files(
            parse_stage_rules(["evil/"]),
            dest=tmp_path,
            files=zip_server["app_files"],
            progress=_quiet,
        )
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]


# ----------------------------------------------------------------------------- bounds
async def test_too_many_files_are_refused_before_any_download(
    zip_server: dict, tmp_path: Path
) -> None:
    zip_server["files"] = {"d/": [{"name": f"f{i}", "type": "file", "size": 1} for i in range(5)]}
    with pytest.raises(
        StagingError, match=r"names at least 5 files.*at most 3 \(CONDA_MAX_STAGED_FILES=3\)"
    ):
        await stage_files(
            parse_stage_rules(["d/"]),
            dest=tmp_path,
            files=zip_server["app_files"],
            progress=_quiet,
            limits=StagingLimits(max_files=3),
        )
    assert zip_server["requests"] == [("file", "d/")]
    assert _tree(tmp_path) == set()


async def test_an_endless_listing_is_cut_off(
    zip_server: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a stand-in: a page size of 2 so a short listing exercises the paging bound.
    monkeypatch.setattr(staging, "LISTING_PAGE", 2)

    async def always_full(request: web.Request) -> web.Response:
        offset = int(request.query["offset"])
        # Folders only: the file bound never trips, the bound on entries must.
        page = [{"name": f"d{offset + i}", "type": "directory"} for i in range(2)]
        return web.json_response(page)

    zip_server["files"] = {"d/": always_full}
    with pytest.raises(StagingError, match=r"more than 10 entries.*CONDA_MAX_STAGED_FILES=5"):
        await stage_files(
            parse_stage_rules(["d/"]),
            dest=tmp_path,
            files=zip_server["app_files"],
            progress=_quiet,
            limits=StagingLimits(max_files=5),
        )
    assert len(zip_server["requests"]) == 6  # pages of 2 until 12 > 10 entries


async def test_bytes_over_the_bound_are_refused_from_the_listing_or_while_streaming(
    zip_server: dict, tmp_path: Path
) -> None:
    zip_server["files"] = {
        "d/": [
            {"name": "a", "type": "file", "size": 600},
            {"name": "b", "type": "file", "size": 600},
        ],
        "one.bin": b"x" * 5000,
    }
    limits = StagingLimits(max_bytes=1000)
    with pytest.raises(
        StagingError, match=r"1200 bytes.*at most 1000 bytes \(CONDA_MAX_STAGED_BYTES=1000\)"
    ):
        await stage_files(
            parse_stage_rules(["d/"]),
            dest=tmp_path,
            files=zip_server["app_files"],
            progress=_quiet,
            limits=limits,
        )
    assert [kind for kind, _ in zip_server["requests"]] == ["file"]  # the listing only
    # A single file's size is not listed: counted as it streams, refused at the bound.
    with pytest.raises(StagingError, match=r"CONDA_MAX_STAGED_BYTES=1000"):
        await stage_files(
            parse_stage_rules(["one.bin"]),
            dest=tmp_path,
            files=zip_server["app_files"],
            progress=_quiet,
            limits=limits,
        )
    assert _tree(tmp_path) == set()


async def test_a_chunked_body_over_the_bound_leaves_no_temporary_file(
    zip_server: dict, tmp_path: Path
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()  # chunked: no Content-Length to check first
        await response.prepare(request)
        for _ in range(200):
            await response.write(b"y" * 1024)
        return response

    zip_server["files"] = {"endless.bin": endless, "main.py": endless}
    with pytest.raises(StagingError, match=r"at least \d+ bytes.*CONDA_MAX_STAGED_BYTES=50000"):
        await stage_files(
            parse_stage_rules(["endless.bin"]),
            dest=tmp_path,
            files=zip_server["app_files"],
            progress=_quiet,
            limits=StagingLimits(max_bytes=50_000),
        )
    assert _tree(tmp_path) == set()
    with pytest.raises(AppFileError, match=r"at least \d+ bytes.*CONDA_MAX_ENTRY_POINT_BYTES=4096"):
        await zip_server["app_files"].read_text("main.py", max_bytes=4096)


def test_the_bounds_are_settings() -> None:
    settings = Settings.from_env(
        {
            "CONDA_MAX_STAGED_FILES": "7",
            "CONDA_MAX_STAGED_BYTES": "1000",
            "CONDA_MAX_ENTRY_POINT_BYTES": "99",
        }
    )
    assert StagingLimits.from_settings(settings) == StagingLimits(max_files=7, max_bytes=1000)
    assert settings.max_entry_point_bytes == 99
    defaults = Settings.from_env({})
    assert (defaults.max_staged_files, defaults.max_staged_bytes) == (10_000, 2 * 1024**3)
    assert defaults.max_entry_point_bytes == 1024**2


# ----------------------------------------------------------------------------- real server
N_MANY = 200
APP_FILES = {
    "main.py": "import os\nSTAGED = sorted(os.listdir('models'))\n",
    "data.csv": "x,y\n1,2\n",
    "source.txt": "renamed content",
    "raw_data/a.txt": "raw a",
    "raw_data/nested/b.txt": "raw b",
}


def _many() -> dict[str, bytes]:
    return {f"models/layer{i % 4}/w{i:03d}.bin": f"weights {i}".encode() for i in range(N_MANY)}


@pytest.fixture(scope="module")
async def many_files_app(client, hypha_server) -> dict:
    """An app installed through the app controller, with N_MANY more files written into
    its artifact's S3 folder (see the module docstring for why)."""
    controller = await client.get_service("public/server-apps")
    marker = "marker-stager-many.txt"
    manifest = {
        "name": "Many",
        "type": "conda-jupyter-kernel",
        "version": "0.1.0",
        "entry_point": "main.py",
        "dependencies": ["python"],
        "channels": ["conda-forge"],
        "files_to_stage": [
            "data.csv",
            "source.txt:renamed.txt",
            "models/",
            "raw_data/:processed_data/",
        ],
    }
    files = {**APP_FILES, marker: "x"}
    app = await controller.install(
        manifest=manifest,
        files=[{"name": n, "content": c, "format": "text"} for n, c in files.items()],
        app_id="stager-many",
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )
    await asyncio.to_thread(_write_into_s3, hypha_server.s3_url, marker, _many())
    token = await hypha_server.user_token("alice-ws")
    return {
        "app": app,
        "controller": controller,
        "token": token,
        "base": f"{hypha_server.url}/alice-ws/artifacts/stager-many/files",
    }


def _write_into_s3(s3_url: str, marker: str, files: dict[str, bytes]) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        aws_access_key_id="local",
        aws_secret_access_key="local-secret",
        region_name="us-east-1",
    )
    bucket = "hypha-workspaces"
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="alice-ws/")
        for obj in page.get("Contents", [])
    ]
    (marker_key,) = [k for k in keys if k.endswith("/" + marker)]
    prefix = marker_key.removesuffix(marker)
    for path, data in files.items():
        s3.put_object(Bucket=bucket, Key=prefix + path, Body=data)


def _requests_for(hypha_server, app_id: str) -> list[str]:
    """The access log's request targets for one app's files."""
    log = hypha_server.log_path.read_text(errors="replace")
    return re.findall(rf'"GET (/alice-ws/artifacts/{app_id}/[^ ]*) HTTP', log)


READ_TREE = """
import json, os
tree = {}
for folder, _, names in os.walk("."):
    for name in names:
        path = os.path.relpath(os.path.join(folder, name), ".")
        with open(path, "rb") as f:
            tree[path] = f.read().decode()
print(json.dumps(tree))
"""


async def test_a_folder_of_many_files_is_staged_with_a_few_zip_requests(
    many_files_app, conda_worker, hypha_server
):
    controller = many_files_app["controller"]
    before = len(_requests_for(hypha_server, "stager-many"))
    session = await controller.start(
        many_files_app["app"]["id"], wait_for_service=False, stage=True, timeout=120
    )
    try:
        result = await conda_worker.execute(session["id"], READ_TREE)
        assert result["status"] == "ok", result
        tree = json.loads(result["outputs"][0]["text"])
        expected = {p: d.decode() for p, d in _many().items()}
        expected.update(
            {
                "data.csv": APP_FILES["data.csv"],
                "renamed.txt": APP_FILES["source.txt"],
                "processed_data/a.txt": "raw a",
                "processed_data/nested/b.txt": "raw b",
            }
        )
        assert tree == expected
        # The entry point ran after staging and saw the folders.
        seen = await conda_worker.execute(session["id"], "print(STAGED)")
        assert seen["outputs"][0]["text"].strip() == str([f"layer{i}" for i in range(4)])
    finally:
        await controller.stop(session["id"])
    requests = _requests_for(hypha_server, "stager-many")[before:]
    zips = [r for r in requests if "/create-zip-file?" in r]
    per_file = [
        r.split("?")[0] for r in requests if "/files/" in r and not r.split("?")[0].endswith("/")
    ]
    # A few zips side by side (see staging_zip.ZIP_FILES_PER_PART), never one per file.
    assert 1 <= len(zips) <= 4, requests
    assert sum(z.count("file=") for z in zips) == N_MANY + 2  # models/ and raw_data/
    # Single files named by the manifest (and the entry point) come on their own.
    assert sorted(p.rsplit("/files/", 1)[1] for p in per_file) == [
        "data.csv",
        "main.py",
        "source.txt",
    ]


async def test_real_server_bounds_refuse_with_their_numbers(many_files_app, tmp_path: Path):
    files = AppFiles(many_files_app["base"], token=many_files_app["token"])
    with pytest.raises(
        StagingError, match=r"names at least \d+ files.*CONDA_MAX_STAGED_FILES=50\)"
    ):
        await stage_files(
            parse_stage_rules(["models/"]),
            dest=tmp_path,
            files=files,
            progress=_quiet,
            limits=StagingLimits(max_files=50),
        )
    total = sum(map(len, _many().values()))
    with pytest.raises(StagingError, match=rf"{total} bytes.*CONDA_MAX_STAGED_BYTES=1000\)"):
        await stage_files(
            parse_stage_rules(["models/"]),
            dest=tmp_path,
            files=files,
            progress=_quiet,
            limits=StagingLimits(max_bytes=1000),
        )
    assert _tree(tmp_path) == set()
    with pytest.raises(AppFileError, match=r"is \d+ bytes.*CONDA_MAX_ENTRY_POINT_BYTES=10\)"):
        await files.read_text("main.py", max_bytes=10)
    assert "STAGED" in await files.read_text("main.py")


@pytest.fixture
async def no_zip_proxy(hypha_server) -> AsyncIterator[dict]:
    """Forwards to the real server, except create-zip-file, answered 404 like a server
    that lacks the endpoint."""
    seen: list[str] = []
    upstream = httpx.AsyncClient(base_url=hypha_server.url, timeout=60)

    async def forward(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.path.endswith("/create-zip-file"):
            return web.json_response({"detail": "Not Found"}, status=404)
        answer = await upstream.get(
            str(request.rel_url),
            headers={"Authorization": request.headers.get("Authorization", "")},
        )
        return web.Response(
            status=answer.status_code,
            body=answer.content,
            content_type=answer.headers.get("content-type", "application/octet-stream").split(";")[
                0
            ],
        )

    app = web.Application()
    app.router.add_get("/{path:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield {"url": f"http://127.0.0.1:{port}", "seen": seen}
    finally:
        await runner.cleanup()
        await upstream.aclose()


async def test_without_the_zip_endpoint_the_real_files_come_one_by_one(
    many_files_app, no_zip_proxy, tmp_path: Path
):
    files = AppFiles(
        no_zip_proxy["url"] + "/alice-ws/artifacts/stager-many/files",
        token=many_files_app["token"],
    )
    report = await stage_files(
        parse_stage_rules(["raw_data/:processed_data/", "models/layer1/:l1/"]),
        dest=tmp_path,
        files=files,
        progress=_quiet,
    )
    layer1 = {p: d for p, d in _many().items() if p.startswith("models/layer1/")}
    assert report.files == 2 + len(layer1)
    assert (tmp_path / "processed_data" / "nested" / "b.txt").read_text() == "raw b"
    for path, data in layer1.items():
        assert (tmp_path / "l1" / path.rsplit("/", 1)[1]).read_bytes() == data
    zips = [p for p in no_zip_proxy["seen"] if p.endswith("/create-zip-file")]
    downloads = [p for p in no_zip_proxy["seen"] if "/files/" in p and not p.endswith("/")]
    assert len(zips) == 1 and len(downloads) == report.files
