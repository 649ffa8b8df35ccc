"""`AsyncEngine`: the engine contract of serve/engine.py (vLLM's `EngineClient` shape), driving the
synchronous `Engine` from a replica's event loop.

`Engine.step` runs in a worker thread, one step after another while there is work; each request's
stream awaits its own row's updates. A consumer that goes away (client disconnect: Serve cancels
its handler; a stop string matched) aborts its row, which leaves the batch at the next step. If
the loop itself dies, `check_health` raises, so Serve replaces the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from adapter.decoding import SamplingParams
from adapter.model import Transformer
from serve.engine import Engine, EngineDead, GenerationRequest, RequestOutput, Sequence

log = logging.getLogger("ray.serve")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.task: asyncio.Task | None = None
        self.wake: asyncio.Event | None = None
        self.rows: dict[str, Sequence] = {}  # request id -> its row, while a stream is open
        self.updated: dict[Sequence, asyncio.Event] = {}
        self.every_step: set[Sequence] = set()  # rows whose consumer wants each token (streams, stop strings)

    @classmethod
    def build(
        cls,
        base: Transformer,
        eos_id: int,
        max_running: int,
        max_waiting: int,
        step_tokens: int,
        compile_decode: bool,
    ) -> AsyncEngine:
        """An engine for one replica, warmed up (compiled, when on) before it takes a request."""
        engine = Engine(base, eos_id, max_running, max_waiting, step_tokens, compile_decode)
        engine.warm_up()
        return cls(engine)

    # --- the contract ---------------------------------------------------------------------------
    @property
    def context_len(self) -> int:
        return self.engine.context

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        self.engine.check(prompt_len, params)

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue now (EngineFull / ContextOverflow raise here), stream later. Call from the event loop."""
        if not self.is_running:
            raise EngineDead("the engine loop has stopped")
        if request.request_id in self.rows:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._start()
        seq = self.engine.add(request.prompt, request.params, request.prefixes, request.seed)
        self.rows[request.request_id] = seq
        event = self.updated[seq] = asyncio.Event()
        if not request.final_only:
            self.every_step.add(seq)
        self.wake.set()
        return self._outputs(request.request_id, seq, event)

    def abort(self, request_id: str, reason: str = "cancelled") -> None:
        seq = self.rows.get(request_id)
        if seq is None or seq.done:
            return
        self.engine.cancel(seq, reason)
        self.wake.set()
        self._notify([seq])

    @property
    def is_running(self) -> bool:
        return self.task is None or not self.task.done()

    def check_health(self) -> None:
        if not self.is_running:
            raise EngineDead(
                f"engine loop stopped: {self.task.exception() if not self.task.cancelled() else 'cancelled'!r}"
            )

    def stats(self) -> dict:
        return self.engine.stats()

    # --- inside ---------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.task is None:
            self.wake = asyncio.Event()
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _outputs(self, request_id: str, seq: Sequence, event: asyncio.Event) -> AsyncIterator[RequestOutput]:
        sent = 0
        try:
            while not seq.done:
                await event.wait()
                event.clear()
                if not seq.done and len(seq.tokens) > sent:  # a prompt chunk alone is no news
                    sent = len(seq.tokens)
                    yield RequestOutput(request_id, list(seq.tokens), batch_size=seq.max_batch)
            yield RequestOutput(request_id, list(seq.tokens), True, seq.finish_reason, seq.error, seq.max_batch)
        finally:  # the consumer stopped iterating or was cancelled: free the row
            if not seq.done:
                self.engine.cancel(seq)
                self.wake.set()
            if self.rows.get(request_id) is seq:
                del self.rows[request_id]

    def _notify(self, seqs) -> None:
        """Wake the streams of rows that changed; forget rows that are done (their stream holds
        what it needs), whether or not anyone still iterates their stream."""
        for seq in seqs:
            event = self.updated.get(seq)
            if event is not None and (seq.done or seq in self.every_step):
                event.set()
            if seq.done:
                self.updated.pop(seq, None)
                self.every_step.discard(seq)
        if any(seq.done for seq in seqs):
            self.rows = {rid: s for rid, s in self.rows.items() if not s.done}

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
