"""The one exception the channel builder raises.

It lives on its own so every step (pip, patchelf, ``.conda`` writing) can raise it
without importing the orchestration, and callers catch a single type whose message
already says what failed and what to do about it.
"""

from __future__ import annotations

__all__ = ["ChannelBuildError"]


class ChannelBuildError(Exception):
    """The channel could not be built; the message says what failed and how to fix it."""
