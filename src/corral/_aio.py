"""asyncio helpers every layer shares."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel the tasks (None and finished ones are skipped) and wait until each is done."""
    live = [task for task in tasks if task is not None and not task.done()]
    for task in live:
        task.cancel()
    for task in live:
        with contextlib.suppress(asyncio.CancelledError):
            await task
