"""Translate a wheel's Requires-Dist into conda ``depends``.

The two worlds disagree on markers, extras and version syntax: conda has no extras and
no environment markers, and only part of PEP 440 means the same in conda. The rules for
bridging that gap (evaluate markers for this interpreter, inline extras, drop what does
not translate) are kept together here so they can be read and tested on their own.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator, Sequence

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import Specifier, SpecifierSet

from hypha_conda_plugin.channel.pypi import Wheel, conda_name

_SIMPLE_VERSION = re.compile(r"^\d+(\.\d+)*$")


def conda_depends(wheel: Wheel, wheels: Sequence[Wheel], names: set[str]) -> list[str]:
    """conda ``depends`` for a wheel: python plus its Requires-Dist for this interpreter.

    Requirements with extras pull in the extra's requirements of the target package, since
    conda has no extras. Names that pip did not download (markers false for us) are left
    out so the solve cannot fail on them.
    """
    by_name = {w.name: w for w in wheels}
    constraints: dict[str, list[str]] = {}
    for req in _active_requirements(wheel.requires, extra=""):
        _collect(req, by_name, constraints, seen=set())
    constraints.pop(wheel.name, None)
    python = "python" if wheel.pure else _python_pin()
    deps = [python]
    for name in sorted(constraints):
        if name not in names:
            continue
        spec = ",".join(dict.fromkeys(constraints[name]))
        deps.append(f"{name} {spec}" if spec else name)
    return deps


def _collect(
    req: Requirement,
    by_name: dict[str, Wheel],
    constraints: dict[str, list[str]],
    seen: set[tuple[str, str]],
) -> None:
    """Add ``req`` (and what its extras require) to ``constraints``."""
    name = conda_name(req.name)
    spec = _conda_spec(req.specifier)
    constraints.setdefault(name, [])
    if spec:
        constraints[name].append(spec)
    target = by_name.get(name)
    for extra in sorted(req.extras):
        if target is None or (name, extra) in seen:
            continue
        seen.add((name, extra))
        for sub in _active_requirements(target.requires, extra=extra, only_extra=True):
            _collect(sub, by_name, constraints, seen)


def _active_requirements(
    requires: Iterable[str], *, extra: str, only_extra: bool = False
) -> Iterator[Requirement]:
    """Requirements whose markers hold for this interpreter (and ``extra``)."""
    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None:
            if not only_extra:
                yield req
            continue
        if only_extra and "extra" not in str(req.marker):
            continue
        if _marker_holds(req.marker, extra):
            yield req


def _marker_holds(marker: Marker, extra: str) -> bool:
    return marker.evaluate({"extra": extra})


def _conda_spec(specifier: SpecifierSet) -> str:
    """Translate a PEP 440 specifier set to conda syntax, dropping what does not map.

    Only plain release versions (``1.2.3``) translate with the same meaning in both
    worlds; anything else is dropped: the channel holds one version per package, the one
    pip chose, so the constraint is satisfied anyway.
    """
    parts = [p for p in (_conda_constraint(s) for s in specifier) if p]
    return ",".join(parts)


def _conda_constraint(spec: Specifier) -> str | None:
    op, version = spec.operator, spec.version
    if op in (">=", "<=", ">", "<", "!=", "==") and _SIMPLE_VERSION.match(version):
        return f"{op}{version}"
    if op == "==" and version.endswith(".*") and _SIMPLE_VERSION.match(version[:-2]):
        return version
    if op == "~=" and _SIMPLE_VERSION.match(version) and "." in version:
        release = [int(x) for x in version.split(".")]
        upper = [*release[:-2], release[-2] + 1]
        return f">={version},<{'.'.join(map(str, upper))}"
    return None


def _python_pin() -> str:
    """Binary wheels only work with the minor version they were built for."""
    major, minor = sys.version_info[:2]
    return f"python >={major}.{minor},<{major}.{minor + 1}"
