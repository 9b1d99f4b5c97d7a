"""Batching that adapts to load, on top of @serve.batch.

@serve.batch forms a batch as soon as its wait ends, even while the previous batch is still
computing; the new batch then queues for the worker. With a short wait, under load, that makes
a train of tiny batches (measured here: batches of 1 at 32 concurrent requests with a zero
wait); with a long wait, a lone request pays the whole wait. `BusyGate` holds callers while the
replica's worker computes, then lets them into the batch queue together: a lone request goes
straight through, and under load a batch holds everything that arrived during the previous one.
No Ray here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class BusyGate:
    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait(self) -> None:
        """Return once the worker is idle (at once if it is)."""
        await self._idle.wait()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Wrap a batch's compute: callers arriving meanwhile wait at `wait`."""
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()
