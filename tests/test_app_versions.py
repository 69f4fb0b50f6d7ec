"""An app runs the files of the version (or stage) it was started at.

Hypha's app controller hands the worker the manifest of the version it resolved, but no
version: the worker finds it (explicit `additional_kwargs`, else the artifact's version
whose manifest matches) and reads the entry point and `files_to_stage` from it. Real
server, real artifact manager (S3 on loopback), the in-server worker.
"""

from __future__ import annotations

import httpx
import pytest

MAIN = """
print("main {tag} sees", open("data.txt").read())
"""


def _manifest(version: str = "0.1.0") -> dict:
    return {
        "name": "Versioned",
        "type": "conda-jupyter-kernel",
        "version": version,
        "entry_point": "main.py",
        "dependencies": ["python", "numpy"],
        "channels": ["conda-forge"],
        "files_to_stage": ["data.txt"],
    }


async def _put(artifacts, app_id: str, files: dict[str, str]) -> None:
    async with httpx.AsyncClient() as http:
        for path, content in files.items():
            url = await artifacts.put_file(app_id, file_path=path)
            (await http.put(url, content=content.encode())).raise_for_status()


def _files(tag: str) -> dict[str, str]:
    return {"main.py": MAIN.format(tag=tag), "data.txt": f"data {tag}"}


async def _install_v0(controller, artifacts, client, app_id: str) -> str:
    """A committed app (v0) whose main.py prints which version's data it found."""
    await controller.install(
        manifest=_manifest(),
        files=[{"name": k, "content": v, "format": "text"} for k, v in _files("v0").items()],
        app_id=app_id,
        overwrite=True,
        wait_for_service=False,
        timeout=180,
    )
    return f"{client.config.workspace}/{app_id}"


async def _stage_new_version(artifacts, full_id: str, tag: str, manifest_version: str | None):
    """Stage a new version with other files; bump the manifest's version if asked."""
    manifest = (await artifacts.read(full_id))["manifest"]
    if manifest_version is not None:
        manifest["version"] = manifest_version
    await artifacts.edit(full_id, stage=True, version="new", manifest=manifest)
    await _put(artifacts, full_id, _files(tag))


async def _run_and_read(controller, app_id: str, **start) -> str:
    """Start the app detached, return what its entry point printed, stop it."""
    session = await controller.start(app_id, wait_for_service=False, timeout=180, **start)
    try:
        logs = await controller.get_logs(session["id"])
    finally:
        await controller.stop(session["id"])
    return str(logs)


async def test_a_staged_new_version_started_with_stage_runs_the_staged_files(client):
    controller = await client.get_service("public/server-apps")
    artifacts = await client.get_service("public/artifact-manager")
    full_id = await _install_v0(controller, artifacts, client, "staged-edit")
    await _stage_new_version(artifacts, full_id, "v1-staged", manifest_version="0.2.0")

    staged = await _run_and_read(controller, "staged-edit", stage=True)
    assert "main v1-staged sees data v1-staged" in staged
    committed = await _run_and_read(controller, "staged-edit")
    assert "main v0 sees data v0" in committed
    assert "v1-staged" not in committed


async def test_identical_manifests_need_the_version_named_in_additional_kwargs(client):
    controller = await client.get_service("public/server-apps")
    artifacts = await client.get_service("public/artifact-manager")
    full_id = await _install_v0(controller, artifacts, client, "same-manifest")
    await _stage_new_version(artifacts, full_id, "v1-same", manifest_version=None)

    # The manifests cannot tell stage from v0 apart: staged files are never picked on a
    # tie, so the committed files run (and the choice is in the logs) ...
    tie = await _run_and_read(controller, "same-manifest", stage=True)
    assert "main v0 sees data v0" in tie
    assert "Reading version v0 of the app" in tie
    # ... unless the start says which it is.
    asked = await _run_and_read(
        controller, "same-manifest", stage=True, additional_kwargs={"stage": True}
    )
    assert "main v1-same sees data v1-same" in asked
    assert "as the start asked" in asked


async def test_an_app_started_at_an_older_version_runs_that_versions_files(client):
    controller = await client.get_service("public/server-apps")
    artifacts = await client.get_service("public/artifact-manager")
    full_id = await _install_v0(controller, artifacts, client, "two-versions")
    await _stage_new_version(artifacts, full_id, "v1", manifest_version="0.2.0")
    await artifacts.commit(full_id, version="v1")

    assert "main v1 sees data v1" in await _run_and_read(controller, "two-versions")
    # Hypha 0.21.137 stops a session started at an older version once it is ready (its
    # own edit(version=...) of a committed version fails) and reports the worker's logs:
    # they show what ran.
    with pytest.raises(Exception) as failure:
        await controller.start("two-versions", version="v0", wait_for_service=False, timeout=180)
    assert "main v0 sees data v0" in str(failure.value)
    assert "data v1" not in str(failure.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stage": "yes"}, "config\\['stage'\\] must be true or false"),
        ({"version": 1.5}, "config\\['version'\\] must be a version name"),
        ({"stage": True, "version": "v0"}, "not both"),
    ],
)
async def test_a_malformed_version_key_is_refused(config, message):
    from hypha_conda_plugin.app_files import AppFiles
    from hypha_conda_plugin.app_version import choose_version
    from hypha_conda_plugin.errors import CondaWorkerError

    async def quiet(_):
        return None

    files = AppFiles(base_url="http://127.0.0.1:9/ws/artifacts/app/files")
    with pytest.raises(CondaWorkerError, match=message):
        await choose_version(files, config, {}, quiet)


def test_a_stored_manifest_matches_hyphas_model_dump_of_it():
    from hypha_conda_plugin.app_version import _canonical, _is_subset

    stored = {"name": "x", "dependencies": ["python"], "description": None}
    dumped = {"name": "x", "dependencies": ["python"], "api_version": "0.1.0", "daemon": False}
    bumped = dict(stored, version="0.2.0")
    assert _is_subset(_canonical(stored), _canonical(dumped))
    assert not _is_subset(_canonical(bumped), _canonical(dumped))
