"""Drives the engine from a replica's event loop: `Engine.step` runs in a worker thread, one step
after another while there is work, and each request awaits its own row's updates.

A request that goes away (client disconnect: Serve cancels its handler; a stop string matched)
cancels its row, which leaves the batch at the next step. If the loop itself dies, `alive` turns
false and the replica's health check fails, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging

from serve.engine import Engine, Sequence

log = logging.getLogger("ray.serve")


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.task: asyncio.Task | None = None
        self.wake: asyncio.Event | None = None
        self.updated: dict[Sequence, asyncio.Event] = {}
        self.every_step: set[Sequence] = set()  # rows whose consumer wants each token (streams, stop strings)

    def start(self) -> None:
        if self.task is None:
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())

    @property
    def alive(self) -> bool:
        return self.task is None or not self.task.done()

    def submit(
        self, prompt: list[int], params, prefixes=None, seed: int | None = None, every_step: bool = True
    ) -> Sequence:
        """Queue a row (raises EngineFull, ContextOverflow). Call from the event loop.
        every_step=False: its consumer is woken only when the row is done (a plain completion
        without stop strings), so the event loop does not wake once per token per row."""
        self.start()
        seq = self.engine.add(prompt, params, prefixes, seed)
        self.updated[seq] = asyncio.Event()
        if every_step:
            self.every_step.add(seq)
        self.wake.set()
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        self.engine.cancel(seq, reason)
        self._notify([seq])

    async def updates(self, seq: Sequence):
        """Yield after each step that changed `seq`, until it is done. Leaving early (the consumer
        was cancelled or stopped iterating) cancels the row."""
        event = self.updated[seq]
        try:
            while not seq.done:
                await event.wait()
                event.clear()
                yield
        finally:
            if not seq.done:
                self.engine.cancel(seq)
                self.wake.set()
            self.updated.pop(seq, None)
            self.every_step.discard(seq)

    def _notify(self, seqs) -> None:
        for seq in seqs:
            event = self.updated.get(seq)
            if event is not None and (seq.done or seq in self.every_step):
                event.set()

    async def _run(self) -> None:
        while True:
            if not self.engine.has_work():
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                touched = await asyncio.to_thread(self.engine.step)
            except Exception as e:  # a bug outside the per-row handling: fail what ran, keep serving
                log.exception("engine step failed")
                touched = self.engine.fail_running(e)
            self._notify(touched)
