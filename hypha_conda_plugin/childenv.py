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
