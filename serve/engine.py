"""Dynamic batching for one replica: requests that arrive together share one generation pass.

Requests queue up; a single loop takes up to `max_batch_size` of them (waiting `batch_wait_s`
after the first so that others can join), runs `adapter.generation.generate` in a thread with
each row's own adapter prefixes and sampling settings, and streams each token to its request's
queue as it is produced. Greedy rows get the same tokens whatever they are batched with.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch

from adapter.generation import SamplingParams, generate
from adapter.model import PromptKV, Transformer

_END = object()


@dataclass
class Job:
    prompt: list[int]
    prefixes: dict[int, PromptKV] | None
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    batch_size: int = 0
    finish_reason: str = "length"
    tokens: list[int] = field(default_factory=list)


class BatchingEngine:
    def __init__(self, base: Transformer, eos_id: int, max_batch_size: int = 8, batch_wait_s: float = 0.02,
                 seed: int = 0):
        self.base, self.eos_id = base, eos_id
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.pending: asyncio.Queue[Job] = asyncio.Queue()
        self.generator = torch.Generator(device=base.tok_embeddings.weight.device).manual_seed(seed)
        self.task: asyncio.Task | None = None
        self.batches_run = 0

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, prompt: list[int], prefixes, params: SamplingParams) -> Job:
        self.start()
        job = Job(prompt, prefixes, params)
        await self.pending.put(job)
        return job

    async def stream(self, job: Job):
        """Yield token ids as they come; job.finish_reason is final once this ends."""
        while True:
            item = await job.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _loop(self) -> None:
        while True:
            batch = [await self.pending.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.pending.get(), timeout))
                except asyncio.TimeoutError:
                    break
            await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for job in batch:
            job.batch_size = len(batch)

        def on_token(row: int, token: int) -> None:
            batch[row].tokens.append(token)
            loop.call_soon_threadsafe(batch[row].queue.put_nowait, token)

        try:
            outs = await asyncio.to_thread(
                generate, self.base, [j.prompt for j in batch], [j.params for j in batch], self.eos_id,
                adapters=[j.prefixes for j in batch], generator=self.generator, on_token=on_token)
            self.batches_run += 1
            for job, out in zip(batch, outs):
                job.finish_reason = "length" if len(out) >= job.params.max_gen_len else "stop"
                job.queue.put_nowait(_END)
        except Exception as e:  # a failed batch fails its requests, not the replica
            for job in batch:
                job.queue.put_nowait(e)
