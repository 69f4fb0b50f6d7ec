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


# ---------------------------------------------------------------- one key per meaning
# Each group is one request written differently; conda and rattler read them alike.
EQUAL_SPECS = [
    ["numpy>=1.0", "numpy >=1.0", "numpy >= 1.0", "NumPy>=1.0", " numpy  >=1.0 "],
    ["numpy>=1.0,<2", "numpy >=1.0, <2", "numpy>=1.0 , < 2"],
    ["numpy>=1.0|<0.5", "numpy >=1.0 | <0.5"],
    ["numpy==1.26", "numpy 1.26", "numpy == 1.26"],
    ["numpy=1.26", "numpy = 1.26", "numpy =1.26", "numpy= 1.26"],
    ["conda-forge::numpy>=1", "conda-forge::numpy >= 1"],
]
# Different requests that must keep different keys: `=1.26` is the prefix match 1.26.*
# (it takes 1.26.4), `==1.26` only 1.26 itself.
DIFFERENT_SPECS = ["numpy=1.26", "numpy==1.26", "numpy>=1.26", "numpy"]
# Forms left as written (build strings, brackets, odd spacing rattler reads its own way).
OTHER_SPECS = [
    "numpy=1.26=py311_0",
    "numpy 1.26 py311_0",
    "numpy >=1.0 py311*",
    "numpy[version='>=1.0']",
    "numpy >1.0<2",
    "numpy 1.26,1.27",
    "python 3.11.*",
    "numpy=*",
    "numpy 1.26.*",
    "numpy *",
]


@pytest.mark.parametrize("group", EQUAL_SPECS)
def test_spellings_of_one_request_share_a_key(group):
    keys = {key({"dependencies": ["python", spec]}) for spec in group}
    assert len(keys) == 1, group


def test_different_requests_keep_different_keys():
    keys = {key({"dependencies": ["python", spec]}) for spec in DIFFERENT_SPECS}
    assert len(keys) == len(DIFFERENT_SPECS)


ALL_SPECS = [s for group in EQUAL_SPECS for s in group] + DIFFERENT_SPECS + OTHER_SPECS


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_normalizing_never_changes_what_rattler_reads(spec):
    from rattler import MatchSpec

    from hypha_conda_plugin.envs.normalize import normalize_conda_spec

    assert str(MatchSpec(normalize_conda_spec(spec))) == str(MatchSpec(spec))


def test_pip_requirements_normalize_by_pep_508():
    from packaging.requirements import Requirement

    from hypha_conda_plugin.envs.normalize import normalize_pip_requirement

    same = ["Requests >= 2, <3", "requests<3,>=2", "requests>=2,<3"]
    assert len({key({"dependencies": [{"pip": [r]}]}) for r in same}) == 1
    assert key({"dependencies": [{"pip": ["requests_oauthlib"]}]}) == key(
        {"dependencies": [{"pip": ["Requests-OAuthlib"]}]}
    )
    for text in [*same, "pkg[b,a] >=1 ; python_version>'3'", "pkg @ https://x/y.whl", "./dir"]:
        normalized = normalize_pip_requirement(text)
        if text != "./dir":
            assert Requirement(normalized) == Requirement(text)


def test_order_spacing_and_duplicates_share_a_key():
    a = key({"dependencies": ["python", "numpy >=1.0", "pandas"]})
    b = key({"dependencies": ["pandas", "numpy>=1.0", "python", "numpy >= 1.0"]})
    assert a == b


# ---------------------------------------------------------------- credentials
def test_credentials_never_reach_what_is_written_down():
    from hypha_conda_plugin.redact import redact

    secret_urls = [
        "https://conda.anaconda.org/t/tk-9f8e7d6c/private-channel",
        "https://alice:hunter2@mirror.example/conda-forge",
        "https://ghp_TOKEN123@github.com/a/b",
        "https://files.example/pkg.whl?token=abc123&x=1",
        "https://bucket.s3/x?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA",
    ]
    for url in secret_urls:
        clean = redact(url)
        for secret in ("tk-9f8e7d6c", "hunter2", "alice", "ghp_TOKEN123", "abc123", "deadbeef"):
            assert secret not in clean
        assert "***" in clean
    assert redact("numpy>=1.0") == "numpy>=1.0"
    assert (
        redact("https://conda.anaconda.org/conda-forge") == "https://conda.anaconda.org/conda-forge"
    )

    spec = EnvSpec.from_manifest(
        {
            "dependencies": ["numpy", {"pip": ["pkg @ https://bob:pw@files.example/p.whl"]}],
            "channels": [secret_urls[0]],
        }
    )
    described = str(spec.describe())
    assert "tk-9f8e7d6c" not in described and "bob:pw" not in described


def test_manifest_tokens_separate_environments_but_a_mirror_password_does_not():
    def with_channel(url: str) -> str:
        return key({"dependencies": ["numpy"], "channels": [url]})

    # Whoever lacks the token cannot reach an environment built with it.
    assert with_channel("https://conda.anaconda.org/t/token-A/private") != with_channel(
        "https://conda.anaconda.org/t/token-B/private"
    )
    # Rotating the operator's mirror credentials keeps every environment.
    manifest = {"dependencies": ["numpy"]}
    assert key(manifest, alias="https://ci:old-pass@mirror.example/") == key(
        manifest, alias="https://ci:new-pass@mirror.example/"
    )


def test_requested_packages_are_the_manifests_own_names():
    # What the background bytecode pass compiles first: the packages the user's cells
    # will import, not the interpreter or what the worker added for the kernel.
    spec = EnvSpec.from_manifest(
        {"dependencies": ["python=3.11", "NumPy >=1.26", "conda-forge::pandas", {"pip": ["x"]}]},
        for_app=True,
    )
    assert spec.requested_packages == {"numpy", "pandas"}
    assert {"ipykernel", "hypha-rpc"} <= set(spec.added)  # in the environment, not first
