"""The manifest's ``{"pip": [...]}`` item is installed with the environment's own pip."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.conftest import WALKTHROUGH_DEPENDENCIES, env_folders


def make_wheel(folder: Path, name: str = "hcp_hello", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel, so the test needs no index or network."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "GREETING = 'hello from a pip package'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


async def test_pip_packages_are_installed_into_the_environment(conda_worker, tmp_path):
    wheel = make_wheel(tmp_path)
    manifest = {"dependencies": [*WALKTHROUGH_DEPENDENCIES, {"pip": [str(wheel)]}]}
    session_id = await conda_worker.start({"id": "with-pip", "manifest": manifest})
    try:
        result = await conda_worker.execute(
            session_id, "import hcp_hello, sys; print(hcp_hello.GREETING); print(sys.prefix)"
        )
        greeting, prefix = result["outputs"][0]["text"].splitlines()
        assert greeting == "hello from a pip package"
        assert "worker-cache" in prefix  # installed into the session's conda env
    finally:
        await conda_worker.stop(session_id)


async def test_failed_pip_install_names_the_requirement_and_leaves_no_env(
    conda_worker, worker_dirs, tmp_path
):
    before = env_folders(worker_dirs)
    missing = tmp_path / "not_there-1.0-py3-none-any.whl"
    manifest = {"dependencies": ["python", {"pip": [str(missing)]}]}
    with pytest.raises(Exception, match=r"pip install .*not_there-1\.0"):
        await conda_worker.start({"id": "pip-fails", "manifest": manifest})
    assert env_folders(worker_dirs) == before
