"""One spelling per meaning for package specs, so equal environments share a cache key.

Only rewrites that conda and rattler read as the same request are made; anything this
module does not fully understand is left as written (a missed match costs one extra
environment, a wrong match would hand out the wrong one). In conda's match-spec language:

* whitespace between the name, operators, commas and pipes does not matter
  (``numpy >= 1.0 , <2`` is ``numpy>=1.0,<2``);
* package names are case-insensitive (``NumPy`` is ``numpy``);
* ``numpy 1.26`` (a bare version) is the exact match ``numpy==1.26``;
* but ``numpy=1.26`` is a *prefix* match (``1.26.*``, so it also takes 1.26.4) and stays
  distinct from ``numpy==1.26``; only its spacing is normalized (``numpy = 1.26``).

Build-string forms (``numpy=1.26=py311_0``), bracket forms (``numpy[build=...]``) and
anything else are left alone. ``tests/test_spec.py`` checks every rewrite against
rattler's own parser.

Pip requirements are PEP 508: parsed with ``packaging`` and written back with the
name normalized (PEP 503) and the version specifiers in a fixed order.
"""

from __future__ import annotations

import re

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

_CHANNEL = r"(?P<channel>[^\s:]+(?:/[^\s:]+)*::)?"
_NAME = r"(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-]*)"
_OP = r"(?:>=|<=|==|!=|~=|>|<)"
_VERSION = r"[A-Za-z0-9_.+!*]+"
_TERM = rf"{_OP}\s*{_VERSION}"
_PLAIN_VERSION = r"[0-9][A-Za-z0-9_.+!]*"

# numpy / numpy>=1.0,<2|==0.5 (operators with any spacing)
_CONSTRAINED = re.compile(
    rf"{_CHANNEL}{_NAME}\s*(?P<constraint>(?:{_TERM}(?:\s*[,|]\s*{_TERM})*)?)"
)
# numpy=1.26 / numpy = 1.26.* (conda's prefix match)
_FUZZY = re.compile(rf"{_CHANNEL}{_NAME}\s*=\s*(?P<version>{_PLAIN_VERSION}(?:\.?\*)?)")
# numpy 1.26 (an exact version, written conda-build style)
_BARE_EXACT = re.compile(rf"{_CHANNEL}{_NAME}\s+(?P<version>{_PLAIN_VERSION})")


def normalize_conda_spec(spec: str) -> str:
    """The canonical spelling of one conda match spec (see the module docstring)."""
    text = spec.strip()
    if match := _CONSTRAINED.fullmatch(text):
        constraint = re.sub(r"\s+", "", match["constraint"])
        return f"{match['channel'] or ''}{match['name'].lower()}{constraint}"
    if match := _FUZZY.fullmatch(text):
        return f"{match['channel'] or ''}{match['name'].lower()}={match['version']}"
    if match := _BARE_EXACT.fullmatch(text):
        return f"{match['channel'] or ''}{match['name'].lower()}=={match['version']}"
    return text


def normalize_pip_requirement(requirement: str) -> str:
    """The canonical spelling of one pip requirement; URLs and paths stay as written."""
    text = requirement.strip()
    try:
        parsed = Requirement(text)
    except InvalidRequirement:
        return text
    out = canonicalize_name(parsed.name)
    if parsed.extras:
        out += "[" + ",".join(sorted(parsed.extras)) + "]"
    if parsed.url:
        out += f" @ {parsed.url}"
        if parsed.marker:
            out += " "
    else:
        out += str(parsed.specifier)
    if parsed.marker:
        out += f"; {parsed.marker}"
    return out
