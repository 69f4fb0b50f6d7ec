"""Build an offline conda channel from this Python interpreter and PyPI wheels.

Air-gapped sites (and this project's test suite, which cannot reach conda-forge) need a
channel that can stand in for conda-forge. The channel is laid out as
``OUT/conda-forge/{<platform>,noarch}/repodata.json`` so that setting the channel alias to
``OUT.as_uri() + "/"`` makes ``conda-forge`` resolve to it.

What goes in:

* ``python``: the running interpreter's base prefix, made relocatable
  (:mod:`.python_package`, :mod:`.elf_rpath`).
* ``pip``, ``ipykernel``, ``hypha-rpc`` and every requested requirement, with their full
  closures as resolved by ``pip download --only-binary=:all:`` (one version each)
  (:mod:`.pypi`, :mod:`.dependencies`). Pure wheels become ``noarch: python`` packages,
  binary wheels become platform packages pinned to the interpreter's minor version
  (:mod:`.wheel_package`).

Packages are written in the ``.conda`` format and indexed by ``repodata.json``
(:mod:`.conda_format`); :mod:`.build` decides what to rebuild and ties the steps
together. This module is only the public surface.
"""

from __future__ import annotations

from hypha_conda_plugin.channel.build import ChannelBuildResult, build_channel
from hypha_conda_plugin.channel.errors import ChannelBuildError

__all__ = ["ChannelBuildError", "ChannelBuildResult", "build_channel"]
