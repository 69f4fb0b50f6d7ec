"""Credentials out of anything the worker writes down.

Channel URLs and pip requirements may carry secrets: conda's token form
``https://conda.anaconda.org/t/<token>/channel``, ``user:password@`` (or a bare token as
the user) in any URL, and tokens in query strings (``?token=...``, signed URLs). They are
needed to reach the channel, so the builder gets them as given; but cache markers, cache
keys, logs, progress messages and error messages only ever see the redacted form.
"""

from __future__ import annotations

import re

REDACTED = "***"

# conda's token form: /t/<token>/ right after the host.
_CONDA_TOKEN = re.compile(r"(?<=/t/)[^/\s?#]+(?=/|$|\s)")
# Userinfo of a URL: scheme://[user[:password]]@host
_USERINFO = re.compile(r"(?<=://)[^/@\s]+(?=@)")
# Query parameters whose value is a secret.
_QUERY_SECRET = re.compile(
    r"(?i)(?<=[?&])((?:access_?)?token|auth|api_?key|key|password|passwd|secret|"
    r"sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=[^&#\s]*"
)


def redact(text: str) -> str:
    """``text`` with every credential found in it replaced by ``***``."""
    if "://" not in text and "/t/" not in text and "=" not in text:
        return text  # the common case (plain package specs) costs nothing
    text = _CONDA_TOKEN.sub(REDACTED, text)
    text = _USERINFO.sub(REDACTED, text)
    return _QUERY_SECRET.sub(lambda m: m.group(0).split("=", 1)[0] + "=" + REDACTED, text)


def has_secret(text: str) -> bool:
    """Whether ``text`` carries a credential that ``redact`` would hide."""
    return redact(text) != text
