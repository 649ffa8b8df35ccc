"""Continuous (iteration-level) batching for one base model, as Orca and vLLM schedule it.

A running batch of rows, each with its own adapter prefixes, sampling settings, seed and token
budget. Every `step()`: rows that finished or were cancelled leave, waiting rows are prefilled and
join, and every running row decodes one token. Nobody waits for a whole batch to finish, and no
row's length limit depends on its neighbours (`prompt + max_gen_len <= context` is checked per
row at admission).

KV cache: one pre-allocated slot of `max_seq_len` per running row (`max_running` slots), kept
compact (running row i is slot i; a leaving row's hole is filled by moving the last row), so a
decode step attends over contiguous views with PyTorch's own attention. Paged blocks would pack
memory tighter, but need a paged-attention kernel (gathering blocks each step in plain PyTorch
copies the whole cache); at the shapes served here (LLaMA-7B, 2,048 context, 16 rows in bf16 is
16 GiB beside 13.5 GiB of weights on an 80 GB GPU) the simple slots fit.

A prefill runs alone (batch 1), so a row's prompt pass is the same whatever else is running;
adapters of different prompt lengths share a decode step through per-row prompt masks
(`adapter.decoding.stack_prefixes`). Failures stay with their rows: a prefill or sampling error
fails that row; a failed decode step is retried row by row and only the rows that fail alone fail.

Thread use: `add` and `cancel` may be called from any thread (the replica's event loop) while
`step` runs in another; only `step` touches the running rows and the caches. No Ray here: tests
and the benchmark drive `step()` from a plain loop.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from adapter.decoding import SamplingParams, sample_row, stack_prefixes
from adapter.model import PromptKV, Transformer


class EngineFull(RuntimeError):
    """The waiting queue is at its bound: the caller should answer 503 and ask the client to retry."""


class ContextOverflow(ValueError):
    def __init__(self, context: int, prompt: int, requested: int):
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + requested} tokens ({prompt} in the prompt, {requested} in the completion). "
            f"Please reduce the length of the prompt or completion."
        )
        self.context, self.prompt, self.requested = context, prompt, requested


@dataclass(eq=False)
class Sequence:
    """One row: a prompt and what has been generated for it so far."""

    prompt: list[int]
    params: SamplingParams
    prefixes: dict[int, PromptKV] | None
    generator: torch.Generator | None  # None for greedy rows
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled" (or the caller's reason), "error"
    error: BaseException | None = None
    max_batch: int = 0  # the largest number of rows it was decoded with
    cancel_reason: str | None = None  # set by cancel(); the row leaves at the next step
    last: int | None = None  # sampled token not yet fed to the model
    length: int = 0  # tokens in its cache slot

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, base: Transformer, eos_id: int, max_running: int = 8, max_waiting: int = 64):
        self.base, self.eos_id = base, eos_id
        self.max_running, self.max_waiting = max_running, max_waiting
        self.context = base.args.max_seq_len
        self.device = base.tok_embeddings.weight.device
        self.caches = base.new_caches(max_running, self.context)
        self.running: list[Sequence] = []  # row i lives in cache slot i
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.RLock()  # guards `waiting`, cancel requests and the finished counts
        self._stacked: dict[int, PromptKV] | None = None  # the running rows' prefixes; None when stale
        self.steps = 0
        self.finished: dict[str, int] = {}  # rows finished, by reason

    # --- from any thread ----------------------------------------------------------------------
    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Admission: a row's own length limit (raises ContextOverflow, a ValueError)."""
        if prompt_len < 1:
            raise ValueError("a prompt needs at least one token")
        if prompt_len + params.max_gen_len > self.context:
            raise ContextOverflow(self.context, prompt_len, params.max_gen_len)

    def add(
        self,
        prompt: list[int],
        params: SamplingParams,
        prefixes: dict[int, PromptKV] | None = None,
        seed: int | None = None,
    ) -> Sequence:
        """Queue a row. seed: its own generator (same seed, same draws, whatever the batch)."""
        self.check(len(prompt), params)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(secrets.randbits(63) if seed is None else seed)
        seq = Sequence(list(prompt), params, prefixes, generator)
        with self.lock:
            # Free slots count as places too: rows queued together (n > 1) join at the next step.
            if len(self.waiting) >= self.max_waiting + self.max_running - len(self.running):
                raise EngineFull(f"{len(self.waiting)} rows are already waiting for a slot")
            self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a row: a waiting one at once, a running one at the next step."""
        with self.lock:
            if seq.done:
                return
            seq.cancel_reason = reason
            if seq in self.waiting:
                self.waiting.remove(seq)
                self._finish(seq, reason)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # --- the step (one thread at a time) -------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Leave, join, decode one token; returns the rows that changed (new tokens or finished)."""
        touched = self._leave()
        with self.lock:
            joining = [
                self.waiting.popleft() for _ in range(min(len(self.waiting), self.max_running - len(self.running)))
            ]
        for seq in joining:
            self._prefill(seq)
            touched.append(seq)
        touched += self._leave()
        if self.running:
            self._decode()
            touched += self.running
        self.steps += 1
        return list(dict.fromkeys(touched))

    def _leave(self) -> list[Sequence]:
        """Drop finished and cancelled rows, moving the last row into each hole."""
        gone = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            with self.lock:
                if seq.cancel_reason is not None and not seq.done:
                    self._finish(seq, seq.cancel_reason)
            if not seq.done:
                i += 1
                continue
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                for c in self.caches:
                    c.k[i, :, : moved.length] = c.k[last, :, : moved.length]
                    c.v[i, :, : moved.length] = c.v[last, :, : moved.length]
                self.running[i] = moved
            self.running.pop()
            self._stacked = None
            gone.append(seq)
        return gone

    def _prefill(self, seq: Sequence) -> None:
        slot = len(self.running)
        try:
            tokens = torch.tensor([seq.prompt], device=self.device)
            caches = [c.rows(slot, slot + 1) for c in self.caches]
            prefixes = stack_prefixes([seq.prefixes]) if seq.prefixes else {}
            with torch.inference_mode():
                h = self.base.hidden(tokens, caches=caches, prefixes=prefixes)
                logits = self.base.output(h[:, -1]).float()
            token = sample_row(logits[0], seq.params.temperature, seq.params.top_p, seq.generator)
        except Exception as e:  # this row only
            self._fail(seq, e)
            return
        seq.length = len(seq.prompt)
        self.running.append(seq)
        self._stacked = None
        self._emit(seq, token)

    def _decode(self) -> None:
        rows = self.running
        try:
            logits = self._forward(0, len(rows))
        except Exception:  # retry alone: only the rows that fail by themselves fail
            for i, seq in enumerate(rows):
                try:
                    self._sample_and_emit(seq, self._forward(i, i + 1, alone=True)[0], len(rows))
                except Exception as e:
                    self._fail(seq, e)
            return
        greedy = logits.argmax(-1).tolist()  # one host sync for every greedy row
        for i, seq in enumerate(rows):
            try:
                self._sample_and_emit(seq, logits[i], len(rows), greedy[i])
            except Exception as e:
                self._fail(seq, e)

    def _forward(self, first: int, stop: int, alone: bool = False) -> torch.Tensor:
        rows = self.running[first:stop]
        if alone:
            prefixes = stack_prefixes([rows[0].prefixes]) if rows[0].prefixes else {}
        else:
            if self._stacked is None:
                self._stacked = stack_prefixes([s.prefixes for s in rows])
            prefixes = self._stacked
        tokens = torch.tensor([[s.last] for s in rows], device=self.device)
        caches = [c.rows(first, stop) for c in self.caches]
        with torch.inference_mode():
            h = self.base.hidden(tokens, start=[s.length for s in rows], caches=caches, prefixes=prefixes)
            logits = self.base.output(h[:, -1]).float()
        for s in rows:
            s.length += 1
        return logits

    def _sample_and_emit(self, seq: Sequence, logits: torch.Tensor, batch: int, greedy: int | None = None) -> None:
        seq.max_batch = max(seq.max_batch, batch)
        if seq.done:
            return
        if seq.params.temperature == 0 and greedy is not None:
            self._emit(seq, greedy)
        else:
            self._emit(seq, sample_row(logits, seq.params.temperature, seq.params.top_p, seq.generator))

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.max_batch = max(seq.max_batch, len(self.running))
        if token == self.eos_id:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.last = token
        if len(seq.tokens) >= seq.params.max_gen_len:
            self._finish(seq, "length")

    def _fail(self, seq: Sequence, e: BaseException) -> None:
        seq.error = e
        self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str) -> None:
        with self.lock:
            if seq.finish_reason is None:
                seq.finish_reason = reason
                self.finished[reason] = self.finished.get(reason, 0) + 1

    def fail_running(self, e: BaseException) -> list[Sequence]:
        """After a step raised outside the per-row handling: fail every running row, free the slots."""
        rows = list(self.running)
        for seq in rows:
            self._fail(seq, e)
        self.running.clear()
        self._stacked = None
        return rows

    def stats(self) -> dict:
        with self.lock:
            return {
                "running": len(self.running),
                "waiting": len(self.waiting),
                "steps": self.steps,
                "finished": dict(self.finished),
            }
