"""Credentials out of anything the worker writes down.

Channel URLs and pip requirements may carry secrets in their URLs: conda's token form
``https://conda.anaconda.org/t/<token>/channel``, ``user:password@`` (or a bare token as
the user) in any URL, and tokens in query strings (``?token=...``, signed URLs). They are
needed to reach the channel, so the builder gets them as given; but cache markers, cache
keys, logs, progress messages and error messages only ever see the redacted form.
"""

from __future__ import annotations

import re

REDACTED = "***"

# The part of a URL after its scheme, as it appears in specs, messages and JSON (up to
# whitespace or a quote).
_URL = re.compile(r"://[^\s\"'<>]*")
# conda's token form: /t/<token>/ (only ever looked for inside a URL).
_CONDA_TOKEN = re.compile(r"(?<=/t/)[^/?#]+(?=/|$)")
# Userinfo of a URL: scheme://[user[:password]]@host
_USERINFO = re.compile(r"(?<=://)[^/@?#]+(?=@)")
# Query parameters whose value is a secret.
_QUERY_SECRET = re.compile(
    r"(?i)(?<=[?&])((?:access_?)?token|auth|api_?key|key|password|passwd|secret|"
    r"sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=[^&#]*"
)


def redact(text: str) -> str:
    """``text`` with every credential in a URL in it replaced by ``***``."""
    position = text.find("://")
    if position < 0:
        return text  # the common case (plain package specs) costs nothing
    parts: list[str] = []
    done = 0
    while position >= 0:  # str.find runs at memory speed; the regex only at each URL
        match = _URL.match(text, position)
        parts.append(text[done:position])
        parts.append(_redact_url(match.group(0)))
        done = match.end()
        position = text.find("://", done)
    parts.append(text[done:])
    return "".join(parts)


def _redact_url(url: str) -> str:
    url = _CONDA_TOKEN.sub(REDACTED, url)
    url = _USERINFO.sub(REDACTED, url)
    return _QUERY_SECRET.sub(lambda m: m.group(0).split("=", 1)[0] + "=" + REDACTED, url)


def has_secret(text: str) -> bool:
    """Whether ``text`` carries a credential that ``redact`` would hide."""
    return redact(text) != text
