"""Environment variables for the processes the worker starts (builds, pip, kernels).

User code runs in these processes, and the worker may live inside a Hypha server whose
environment holds secrets (S3 keys, JWT secrets, tokens). So children start from a
short allowlist of harmless host variables, never from a copy of the server's
environment, and host Python settings (PYTHONPATH, VIRTUAL_ENV, ...) cannot leak in and
make the environment's Python import the wrong packages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PASSTHROUGH = (
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TERM",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
)
PASSTHROUGH_PREFIXES = ("LC_",)
# Where and how patiently pip fetches: the mirror settings an administrator sets for
# air-gapped machines. Only pip steps (a build's pip item, the channel builder) see them.
PIP_MIRROR = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_NO_INDEX",
    "PIP_FIND_LINKS",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
    "PIP_CLIENT_CERT",
    "PIP_PROXY",
    "PIP_CONFIG_FILE",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_TIMEOUT",
    "PIP_RETRIES",
)
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def clean_env(
    prefix: Path | None = None,
    *,
    extra: Mapping[str, str] | None = None,
    pip_mirror: bool = False,
    host: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A minimal environment for a child process, activated for ``prefix`` if given."""
    source = os.environ if host is None else host
    env = {
        key: value
        for key, value in source.items()
        if key in PASSTHROUGH
        or key.startswith(PASSTHROUGH_PREFIXES)
        or (pip_mirror and key in PIP_MIRROR)
    }
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("LANG", "C.UTF-8")
    path = SYSTEM_PATH
    if prefix is not None:
        env["CONDA_PREFIX"] = str(prefix)
        path = f"{prefix / 'bin'}:{path}"
    env["PATH"] = path
    if extra:
        env.update(extra)
    return env


# What a package manager (conda, mamba, micromamba) reads besides the harmless host
# variables above: where its own configuration, caches and root live, how it reaches the
# network, and the virtual-package overrides (CONDA_OVERRIDE_CUDA, ...). Everything else
# a tool needs belongs in its rc file, which CONDARC / MAMBARC / HOME point it at. Never
# passed: the worker's own settings (conda would read CONDA_CHANNEL_ALIAS and
# CONDA_DEFAULT_CHANNELS as its own), HYPHA_* tokens, the server's secrets, PIP_*, and
# the worker's own activation (CONDA_PREFIX, PYTHONPATH, ...).
PACKAGE_MANAGER_PASSTHROUGH = (
    "CONDARC",
    "MAMBARC",
    "MAMBA_ROOT_PREFIX",
    "CONDA_PKGS_DIRS",
    "CONDA_ENVS_PATH",
    "XDG_CONFIG_HOME",
    "XDG_CACHE_HOME",
    "XDG_DATA_HOME",
    "ALL_PROXY",
    "all_proxy",
    "CURL_CA_BUNDLE",
    "CONDA_SSL_VERIFY",
    "MAMBA_SSL_VERIFY",
)
PACKAGE_MANAGER_PREFIXES = ("CONDA_OVERRIDE_",)


def package_manager_env(tool_dir: Path, *, host: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a conda/mamba/micromamba child: its config, never our secrets.

    ``tool_dir`` (the folder holding the tool) goes first on PATH, so the tool finds
    its own helpers and interpreter.
    """
    source = os.environ if host is None else host
    env = clean_env(host=source)
    env.update(
        (key, value)
        for key, value in source.items()
        if key in PACKAGE_MANAGER_PASSTHROUGH or key.startswith(PACKAGE_MANAGER_PREFIXES)
    )
    env["PATH"] = f"{tool_dir}:{SYSTEM_PATH}"
    return env
