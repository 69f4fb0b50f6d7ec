"""Manifest validation and cache keys of environment specs."""

from __future__ import annotations

import pytest

from hypha_conda_plugin.envs.spec import EnvSpec, resolve_channel
from hypha_conda_plugin.errors import ManifestError

ALIAS = "file:///srv/mirror/"


def key(manifest: dict, alias: str | None = ALIAS) -> str:
    return EnvSpec.from_manifest(manifest).cache_key(channel_alias=alias, platform="linux-64")


def test_environment_yml_shape_with_pip_item():
    spec = EnvSpec.from_manifest(
        {"dependencies": ["python=3.11", "numpy", {"pip": ["requests==2.32.3"]}]}
    )
    assert spec.conda == ("python=3.11", "numpy", "ipykernel", "pip")
    assert spec.pip == ("requests==2.32.3",)
    assert spec.channels == ("conda-forge",)
    assert spec.added == ("ipykernel", "pip")  # pip: the pip item, and %pip in sessions


def test_kernel_and_app_packages_are_added_once():
    assert EnvSpec.from_manifest({"dependencies": ["ipykernel>=6", "pip"]}).added == ("python",)
    app = EnvSpec.from_manifest({"dependencies": ["python"]}, for_app=True)
    assert app.added == ("ipykernel", "pip", "hypha-rpc")


def test_key_ignores_order_and_duplicates_but_not_channel_order():
    a = key({"dependencies": ["numpy", "pandas"], "channels": ["conda-forge", "bioconda"]})
    b = key({"dependencies": ["pandas", "numpy", "numpy"], "channels": ["conda-forge", "bioconda"]})
    c = key({"dependencies": ["numpy", "pandas"], "channels": ["bioconda", "conda-forge"]})
    assert a == b
    assert a != c


def test_key_changes_with_packages_pip_alias_and_platform():
    base = {"dependencies": ["numpy"]}
    assert key(base) != key({"dependencies": ["numpy=2"]})
    assert key(base) != key({"dependencies": ["numpy", {"pip": ["x"]}]})
    assert key(base) != key(base, alias="https://mirror.example/")
    spec = EnvSpec.from_manifest(base)
    assert spec.cache_key(channel_alias=None, platform="linux-64") != spec.cache_key(
        channel_alias=None, platform="osx-arm64"
    )


def test_channel_names_resolve_under_the_alias_and_urls_pass_through():
    assert resolve_channel("conda-forge", ALIAS) == "file:///srv/mirror/conda-forge"
    assert resolve_channel("https://x/ch", ALIAS) == "https://x/ch"
    assert resolve_channel("/local/ch", ALIAS) == "/local/ch"
    assert resolve_channel("conda-forge", None) == "conda-forge"


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"dependencies": 3}, "'dependencies' must be a list"),
        ({"dependencies": "numpy\nrm -rf /"}, "empty or multi-line"),
        ({"dependencies": [3]}, "must be a string"),
        ({"dependencies": ["  "]}, "empty or multi-line"),
        ({"dependencies": ["numpy\nrm -rf /"]}, "empty or multi-line"),
        ({"dependencies": [{"conda": ["x"]}]}, "only mapping allowed"),
        ({"dependencies": [{"pip": "requests"}]}, "'pip' must be a list"),
        ({"channels": 5}, "'channels' must be a list"),
        ({"channels": "--override-channels"}, "looks like a command-line option"),
        ({"dependencies": [{"pip": ["-r /etc/shadow"]}]}, "looks like a command-line option"),
        ({"dependencies": ["--override-channels"]}, "looks like a command-line option"),
    ],
)
def test_malformed_manifests_are_refused_with_a_helpful_message(manifest, message):
    with pytest.raises(ManifestError, match=message):
        EnvSpec.from_manifest(manifest)


def test_a_single_string_is_a_one_item_list_as_in_hyphas_own_worker():
    # `dependencies: python=3.11` and `channels: conda-forge` in a YAML manifest written
    # for Hypha's built-in worker, which reads either as a list of one.
    as_strings = {"dependencies": "numpy", "channels": "conda-forge"}
    as_lists = {"dependencies": ["numpy"], "channels": ["conda-forge"]}
    spec = EnvSpec.from_manifest(as_strings)
    assert spec == EnvSpec.from_manifest(as_lists)
    assert "numpy" in spec.conda and spec.channels == ("conda-forge",)
    assert key(as_strings) == key(as_lists)
