"""Where the worker looks for an app's files, from the config the app controller sends."""

from __future__ import annotations

import pytest

from hypha_conda_plugin.app_files import AppFiles


def test_a_bare_session_has_no_app_files():
    assert AppFiles.for_start({"manifest": {}}, "http://hypha") is None


def test_the_controllers_files_url_is_used_as_given():
    files = AppFiles.for_start(
        {
            "app_id": "doubler",
            "app_files_base_url": "http://local:9527/ws/artifacts/doubler/files",
            "token": "t",
            "disable_ssl": True,
        },
        "http://public",
    )
    assert files == AppFiles("http://local:9527/ws/artifacts/doubler/files", "t", False)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"artifact_id": "ws-1/my-app"}, "http://hypha/ws-1/artifacts/my-app/files"),
        ({"app_id": "my-app", "workspace": "ws-2"}, "http://hypha/ws-2/artifacts/my-app/files"),
        (
            {"app_id": "a", "workspace": "w", "server_url": "http://other"},
            "http://other/w/artifacts/a/files",
        ),
    ],
)
def test_the_files_url_is_derived_from_the_artifact(config, expected):
    assert AppFiles.for_start(config, "http://hypha").base_url == expected


def test_urls_quote_paths_and_mark_folder_listings():
    files = AppFiles("http://h/ws/artifacts/a/files/")
    assert files.url("data/my file.csv") == "http://h/ws/artifacts/a/files/data/my%20file.csv"
    assert files.url("models/", folder=True) == "http://h/ws/artifacts/a/files/models/"


def test_the_zip_endpoint_sits_beside_files_and_takes_the_version():
    files = AppFiles("http://h/ws/artifacts/a/files/")
    assert files.zip_url == "http://h/ws/artifacts/a/create-zip-file"
    assert files.zip_params == {}
    # create-zip-file ignores stage=true: the staged files are version=stage there.
    assert AppFiles("http://h/ws/artifacts/a/files", stage=True).zip_params == {"version": "stage"}
    assert AppFiles("http://h/ws/artifacts/a/files", version="v2").zip_params == {"version": "v2"}
    assert AppFiles("http://h/some/other/place").zip_url is None
