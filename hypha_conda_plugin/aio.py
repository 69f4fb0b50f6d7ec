"""Small asyncio helpers shared by the worker's modules."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any


async def gather_or_cancel(awaitables: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run all at once; on the first failure cancel the others, wait for them, re-raise.

    ``asyncio.gather`` leaves the others running when one fails, which would leave a
    download or a kernel start going for a session that already failed.
    """
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
