"""Manifests written for Hypha's built-in conda worker work unchanged on ours.

The forms come from Hypha's own tests of its worker (tests/test_conda_env.py and
tests/test_conda_kernel.py in amun-ai/hypha): conda specs with versions, no dependencies
at all, and `dependencies`/`channels` given as a single string (what `channels:
conda-forge` in a YAML manifest is), which that worker reads as a one-item list. Each is
replayed against a real server: a direct start, and an app installed and started through
Hypha's app controller (whose own manifest model wants lists).
"""

from __future__ import annotations

import pytest

HYPHA_FORMS = {
    "single-strings": {
        "type": "conda-jupyter-kernel",
        "dependencies": "python=3.11",
        "channels": "conda-forge",
    },
    "no-dependencies": {"type": "conda-jupyter-kernel"},
    "pinned-list": {
        "type": "conda-jupyter-kernel",
        "dependencies": ["python=3.11", "numpy"],
        "channels": ["conda-forge"],
    },
}


@pytest.mark.parametrize("form", HYPHA_FORMS)
async def test_hypha_manifest_forms_start_and_run(conda_worker, form):
    session_id = await conda_worker.start({"id": f"form-{form}", "manifest": HYPHA_FORMS[form]})
    try:
        result = await conda_worker.execute(
            session_id, "import sys; print('%d.%d' % sys.version_info[:2])"
        )
        assert result["status"] == "ok", result
        assert result["outputs"][0]["text"].startswith("3.")
    finally:
        await conda_worker.stop(session_id)


async def test_a_yaml_style_app_with_single_strings_installs_and_runs(client):
    controller = await client.get_service("public/server-apps")
    manifest = {
        "name": "Single strings",
        "type": "conda-jupyter-kernel",
        "entry_point": "main.py",
        "dependencies": "python=3.11",
        "channels": "conda-forge",
    }
    app = await controller.install(
        manifest=manifest,
        files=[{"name": "main.py", "content": "print('single strings ran')", "format": "text"}],
        app_id="single-strings",
        overwrite=True,
        wait_for_service=False,
        stage=True,
    )
    # Stored as the lists they mean, which Hypha's app model requires.
    assert app["dependencies"] == ["python=3.11"] and app["channels"] == ["conda-forge"]
    session = await controller.start(app["id"], stage=True, wait_for_service=False, timeout=180)
    try:
        assert "single strings ran" in str(await controller.get_logs(session["id"]))
    finally:
        await controller.stop(session["id"])
