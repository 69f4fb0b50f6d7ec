"""Normalized description of an environment, and the key it is cached under.

A manifest's ``dependencies`` follow environment.yml: conda match specs as strings, plus
an optional ``{"pip": [...]}`` item. ``EnvSpec`` validates that shape once, adds what
the kernel needs, and derives a stable cache key, so two manifests that ask for the same
environment share it however their lists are ordered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from hypha_conda_plugin.envs.normalize import normalize_conda_spec, normalize_pip_requirement
from hypha_conda_plugin.errors import ManifestError
from hypha_conda_plugin.redact import has_secret, redact

# pip: a session's own `%pip install` (into its private user site) must work.
KERNEL_PACKAGES = ("ipykernel", "pip")
APP_PACKAGES = ("hypha-rpc",)
#: 2: specs normalized (envs/normalize.py), credentials out of the hashed text.
KEY_VERSION = 2


def _clean_item(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ManifestError(
            f"{where} must be a string such as 'numpy>=1.26', got {type(value).__name__}: "
            f"{value!r}."
        )
    text = value.strip()
    if not text or any(char in text for char in "\n\r\0"):
        raise ManifestError(f"{where} has an empty or multi-line entry {value!r}; remove it.")
    if text.startswith("-"):
        # Tools would read it as an option (pip's -r FILE, --index-url URL, ...).
        raise ManifestError(
            f"{where} is {value!r}, which looks like a command-line option; only package "
            "requirements are allowed (set mirrors with CONDA_CHANNEL_ALIAS or pip's config)."
        )
    return text


def _package_name(spec: str) -> str:
    """The package name a conda match spec refers to (enough for de-duplication)."""
    name = spec.split("::")[-1]
    for stop in " =<>!~[":
        name = name.split(stop)[0]
    return name.lower()


def is_channel_url(channel: str) -> bool:
    """Whether a channel is a location (URL or path) rather than a name to alias."""
    return "://" in channel or channel.startswith(("/", "./", "../", "~"))


def resolve_channel(channel: str, alias: str | None) -> str:
    """Where a channel lives: names go under the alias, as conda's channel_alias does."""
    if is_channel_url(channel) or alias is None:
        return channel
    return alias.rstrip("/") + "/" + channel.strip("/")


@dataclass(frozen=True)
class EnvSpec:
    """What goes into one environment. Immutable and hashable."""

    conda: tuple[str, ...]
    channels: tuple[str, ...]
    pip: tuple[str, ...] = ()
    added: tuple[str, ...] = field(default=(), compare=False)

    @property
    def requested_packages(self) -> frozenset[str]:
        """Names of the conda packages the manifest asked for, but python (the
        interpreter is in every environment) and those the worker added."""
        named = frozenset(_package_name(spec) for spec in self.conda)
        return named - set(self.added) - {"python"}

    @classmethod
    def from_manifest(
        cls,
        manifest: Mapping[str, object],
        *,
        default_channels: Sequence[str] = ("conda-forge",),
        for_app: bool = False,
    ) -> EnvSpec:
        """Validate a manifest's dependencies and channels; add the kernel's packages."""
        conda, pip = cls._split_dependencies(manifest.get("dependencies"))
        channels = cls._channels(manifest.get("channels"), default_channels)
        present = {_package_name(spec) for spec in conda}
        required = KERNEL_PACKAGES + (APP_PACKAGES if for_app else ())
        added = tuple(name for name in required if name not in present)
        if "python" not in present and "python" not in added:
            added = ("python", *added)
        return cls(conda=(*conda, *added), channels=channels, pip=pip, added=added)

    @staticmethod
    def _split_dependencies(raw: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if raw is None:
            return (), ()
        if isinstance(raw, str):
            raw = [raw]  # Hypha's own worker reads a single string as a one-item list.
        if not isinstance(raw, Iterable):
            raise ManifestError(
                "manifest 'dependencies' must be a list, e.g. ['python=3.11', 'numpy', "
                f"{{'pip': ['requests']}}], got {type(raw).__name__}."
            )
        conda: list[str] = []
        pip: list[str] = []
        for index, item in enumerate(raw):
            where = f"manifest 'dependencies' item {index}"
            if isinstance(item, Mapping):
                if set(item) != {"pip"}:
                    raise ManifestError(
                        f"{where} is a mapping with keys {sorted(item)}; the only mapping "
                        "allowed is {'pip': ['package', ...]}."
                    )
                packages = item["pip"]
                if isinstance(packages, str) or not isinstance(packages, Iterable):
                    raise ManifestError(f"{where}: 'pip' must be a list of requirements.")
                pip.extend(_clean_item(p, f"{where} (pip)") for p in packages)
            else:
                conda.append(_clean_item(item, where))
        return tuple(dict.fromkeys(conda)), tuple(dict.fromkeys(pip))

    @staticmethod
    def _channels(raw: object, default: Sequence[str]) -> tuple[str, ...]:
        if raw is None or raw == []:
            return tuple(default)
        if isinstance(raw, str):
            raw = [raw]  # `channels: conda-forge` in YAML, as Hypha's own worker reads it.
        if not isinstance(raw, Iterable):
            raise ManifestError(
                f"manifest 'channels' must be a list such as ['conda-forge'], got {raw!r}."
            )
        channels = [_clean_item(c, "manifest 'channels' entry") for c in raw]
        return tuple(dict.fromkeys(channels))

    def cache_key(self, *, channel_alias: str | None, platform: str) -> str:
        """A stable key: one key per meaning, never a credential in what is hashed.

        Package specs are normalized (``numpy >=1.0`` is ``numpy>=1.0``), de-duplicated
        and sorted; channel order is kept because it decides which channel wins when
        several have a package. Channels are hashed as the locations they resolve to,
        with credentials redacted, so rotating a mirror's password in
        ``CONDA_CHANNEL_ALIAS`` keeps every environment. Credentials a *manifest* carries
        (a private channel's token) still separate environments, through a digest of
        them: whoever lacks the token cannot reach an environment built with it by
        writing the same spec with another token.
        """
        conda = sorted({redact(normalize_conda_spec(s)) for s in self.conda})
        pip = sorted({redact(normalize_pip_requirement(r)) for r in self.pip})
        payload: dict[str, object] = {
            "v": KEY_VERSION,
            "platform": platform,
            "conda": conda,
            "pip": pip,
            "channels": [redact(resolve_channel(c, channel_alias)) for c in self.channels],
        }
        secrets = [s for s in (*self.channels, *self.conda, *self.pip) if has_secret(s)]
        if secrets:
            payload["credentials"] = hashlib.sha256("\n".join(secrets).encode()).hexdigest()
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return digest[:20]

    def describe(self) -> dict[str, list[str]]:
        """The spec as it may be written down (cache marker, listings): no credentials."""
        return {
            "conda": [redact(s) for s in self.conda],
            "pip": [redact(r) for r in self.pip],
            "channels": [redact(c) for c in self.channels],
        }
