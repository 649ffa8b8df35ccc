"""Continuous (iteration-level) batching for one base model, with chunked prefill, as Orca, vLLM and
Sarathi schedule it; and the contract the Serve app talks to.

## The engine contract (what `serve/app.py` may use; changing the engine touches serve/engine* only)

In the shape of vLLM's `EngineClient`; the implementation is `serve.engine_loop.AsyncEngine`:

- `check(prompt_len, params)`: admission, before anything is queued. Raises `ContextOverflow` (a
  ValueError with OpenAI's wording) when `prompt + max_gen_len` does not fit the context.
- `generate(request: GenerationRequest) -> AsyncIterator[RequestOutput]`: queues the request at
  once (raises `EngineFull` at once, before any output, when the queue is at its bound: answer
  503) and returns its stream of outputs. Each `RequestOutput` holds every token id so far
  (cumulative, as vLLM's default); the last one has `finished=True`, a `finish_reason` ("stop":
  EOS, "length", "cancelled" or the reason given to `abort`, "error" with `error` set) and
  `batch_size` (the most rows it was decoded with). `final_only=True` requests get only that last
  output (the event loop is not woken once per token for a plain completion). A consumer that
  stops iterating (client gone, task cancelled) aborts its request.
- `abort(request_id, reason="cancelled")`: a waiting request leaves at once, a running one at the
  next step; its stream ends with that finish reason. Unknown or finished ids are ignored.
- `check_health()`: raises `EngineDead` once the engine loop has died (Serve then replaces the
  replica); `is_running` says the same without raising.
- `stats()`: running / prefilling / waiting rows, steps, finished counts by reason, settings.
- `context_len`: the longest prompt + completion a request may have.

## The scheduler (`Engine`, synchronous, no asyncio, no Ray: tests and benchmarks drive `step()`)

Every `step()`: finished and cancelled rows leave; waiting rows take free cache slots; then the
step's token budget (`step_tokens`) is spent: one token for every decoding row first, the rest on
chunks of the prompts still being prefilled, first come first served, several prompts batched in
one forward pass (padded to the longest chunk, the padding counted against the budget). A long
prompt therefore enters over several steps and never stalls the decoding rows for longer than one
budget's worth of compute; short prompts that arrive together prefill together. The decode rows
and the chunks share ONE forward (`DecodeStep.mixed`), as vLLM fuses them: every matrix product
runs once over all the step's tokens, so the weights are read once per step, not once per pass;
rotary, the cache writes and attention run per group (vLLM uses one varlen attention kernel; plain
PyTorch attention wants equal lengths, so here it is one call for the decode rows and one for the
chunks). `stats()["fused_fallbacks"]` counts steps whose one forward failed and ran as two.

KV cache: one pre-allocated slot of `max_seq_len` per row (`max_running` slots), kept compact:
slots [0, n_decoding) hold the decoding rows, the next ones the rows being prefilled, so each
forward attends over one contiguous view with PyTorch's own attention. A row whose prompt is done
moves into the decoding block; a leaving row's hole is filled by moving a row (copying its cache
slot). Paged blocks would pack memory tighter but need a paged-attention kernel; at the shapes
served here (LLaMA-7B, 2,048 context, 16 rows in bf16 is 16 GiB beside 13.5 GiB of weights on an
80 GB GPU) the simple slots fit.

Every forward runs `adapter.decode_step.DecodeStep` (fused projections, few ops per layer; the
model's own `Transformer.hidden` stays the reference it is tested against). The decode-only forward
can be compiled (`compile_decode`): batch sizes are rounded up to a few buckets so shapes repeat,
and each bucket is compiled at `warm_up()` (the replica's start); adapters on a set of layers not
seen before compile their bucket once, in the step that first meets them. Steps with a prompt
joining run uncompiled.

Adapters of different prompt lengths share a forward through per-row prompt masks
(`adapter.decoding.stack_prefixes`); an image row is a row whose prefixes carry its image token.
Failures stay with their rows: a failed prefill batch is retried row by row, a failed decode step
too, and only the rows that fail alone fail. Greedy output of a row does not depend on its
neighbours, on when it joins, or on how its prompt was chunked (CPU, fp32; tested).

Thread use: `add` and `cancel` may be called from any thread (the replica's event loop) while
`step` runs in another; only `step` touches the rows in slots and the caches.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from adapter.decode_step import DecodeStep
from adapter.decoding import SamplingParams, sample_row, stack_prefixes
from adapter.model import PromptKV, Transformer

log = logging.getLogger(__name__)

DEFAULT_STEP_TOKENS = 256  # serve/serve_config.py's default too; tests and benchmarks build engines directly


class EngineFull(RuntimeError):
    """The waiting queue is at its bound: the caller should answer 503 and ask the client to retry."""


class EngineDead(RuntimeError):
    """The engine loop has stopped; no request will be served by this engine again."""


class ContextOverflow(ValueError):
    def __init__(self, context: int, prompt: int, requested: int):
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + requested} tokens ({prompt} in the prompt, {requested} in the completion). "
            f"Please reduce the length of the prompt or completion."
        )
        self.context, self.prompt, self.requested = context, prompt, requested


@dataclass
class GenerationRequest:
    """What a caller submits: token ids (BOS included), sampling, the adapter's prompt keys/values
    (None: the base model), a seed (same seed, same draws, whatever the batch)."""

    prompt: list[int]
    params: SamplingParams
    prefixes: dict[int, PromptKV] | None = None
    seed: int | None = None
    final_only: bool = False  # only the last output (no wake-up per token)
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass
class RequestOutput:
    """One update of a request: all its token ids so far; `finished` on the last one."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: BaseException | None = None
    batch_size: int = 0  # the most rows it was decoded with


@dataclass(eq=False)
class Sequence:
    """One row inside the engine: a prompt and what has been generated for it so far."""

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
    length: int = 0  # tokens in its cache slot (prompt tokens while prefilling)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(
        self,
        base: Transformer,
        eos_id: int,
        max_running: int = 8,
        max_waiting: int = 64,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        compile_decode: bool = False,
    ):
        if step_tokens <= max_running:
            raise ValueError(
                f"step_tokens ({step_tokens}) must be above max_running ({max_running}): every decoding "
                "row takes one token of a step's budget and prompts need the rest"
            )
        self.base, self.eos_id = base, eos_id
        self.max_running, self.max_waiting, self.step_tokens = max_running, max_waiting, step_tokens
        self.context = base.args.max_seq_len
        self.device = base.tok_embeddings.weight.device
        self.caches = base.new_caches(max_running, self.context)
        self.decoder = DecodeStep(base, self.caches, compile=compile_decode)
        self.slots: list[Sequence] = []  # slot i holds slots[i]: decoding rows first, then prefilling
        self.n_decoding = 0
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.RLock()  # guards `waiting`, cancel requests and the finished counts
        self._stacked: dict[int, PromptKV] | None = None  # the decoding rows' prefixes; None when stale
        self._stacked_rows: list = []
        self.steps = 0
        self.finished: dict[str, int] = {}  # rows finished, by reason
        self.fused_fallbacks = 0  # steps whose one forward failed and ran as two

    @property
    def running(self) -> list[Sequence]:
        """The rows holding a cache slot (decoding or being prefilled)."""
        return self.slots

    def warm_up(self) -> None:
        """Compile (if on) and run every decode bucket once, so no request pays for it."""
        self.decoder.warm_up()

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
            if len(self.waiting) >= self.max_waiting + self.max_running - len(self.slots):
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
        return bool(self.slots or self.waiting)

    # --- the step (one thread at a time) -------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Leave, join, decode one token per decoding row, prefill chunks with the rest of the
        budget; returns the rows that changed (new tokens or finished)."""
        touched = self._leave()
        with self.lock:
            free = self.max_running - len(self.slots)
            self.slots += [self.waiting.popleft() for _ in range(min(len(self.waiting), free))]
        chunks = self._plan_chunks()
        if self.n_decoding and chunks:
            touched += self.slots[: self.n_decoding]
            touched += self._decode_and_prefill(chunks)
        elif self.n_decoding:
            touched += self.slots[: self.n_decoding]
            self._decode()
        else:
            touched += self._prefill(chunks)
        touched += self._leave()
        self.steps += 1
        return list(dict.fromkeys(touched))

    def _plan_chunks(self) -> list[int]:
        """Prompt tokens for each prefilling row this step, in slot order (a run from the first
        prefilling slot): the budget left after the decode rows, padding included, never past a
        cache slot's end."""
        budget = self.step_tokens - self.n_decoding
        chunks: list[int] = []
        widest, deepest = 0, 0  # the batch's padded width, its rows' largest cache fill
        for seq in self.slots[self.n_decoding :]:
            rows = len(chunks) + 1
            limit = min(budget // rows, self.context - max(deepest, seq.length))
            if limit < max(widest, 1):
                break
            chunk = min(len(seq.prompt) - seq.length, limit)
            chunks.append(chunk)
            widest, deepest = max(widest, chunk), max(deepest, seq.length)
        return chunks

    def _leave(self) -> list[Sequence]:
        """Drop finished and cancelled rows, keeping the slots compact (decoding block first)."""
        gone = []
        i = 0
        while i < len(self.slots):
            seq = self.slots[i]
            with self.lock:
                if seq.cancel_reason is not None and not seq.done:
                    self._finish(seq, seq.cancel_reason)
            if not seq.done:
                i += 1
                continue
            if i < self.n_decoding:  # the last decoding row fills the hole, the last row fills its place
                self._move(self.n_decoding - 1, i)
                self.n_decoding -= 1
                i_hole = self.n_decoding
                self._stacked = None
            else:
                i_hole = i
            self._move(len(self.slots) - 1, i_hole)
            self.slots.pop()
            gone.append(seq)
        return gone

    def _move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        seq = self.slots[src]
        for c in self.caches:
            c.k[dst, :, : seq.length] = c.k[src, :, : seq.length]
            c.v[dst, :, : seq.length] = c.v[src, :, : seq.length]
        self.slots[dst] = seq

    def _swap(self, i: int, j: int) -> None:
        if i == j:
            return
        a, b = self.slots[i], self.slots[j]
        n = max(a.length, b.length)
        for c in self.caches:
            for t in (c.k, c.v):
                keep = t[i, :, :n].clone()
                t[i, :, :n] = t[j, :, :n]
                t[j, :, :n] = keep
        self.slots[i], self.slots[j] = b, a

    # --- decode rows and prompt chunks in one forward ------------------------------------------------
    def _decode_and_prefill(self, chunks: list[int]) -> list[Sequence]:
        """One forward for the decoding rows and the prompt chunks (the weights are read once); if
        it fails, the two run apart, each with its row-by-row retries, so only failing rows fail."""
        first = self.n_decoding
        decoding, prefilling = self.slots[:first], self.slots[first : first + len(chunks)]
        try:
            tokens, positions = [s.last for s in decoding], [s.length for s in decoding]
            prefixes = self._decoding_prefixes(decoding, spare=0)
            chunk, starts, chunk_prefixes, done, at = self._chunk_inputs(prefilling, chunks)
            logits, chunk_logits = self.decoder.mixed(
                tokens, positions, prefixes, chunk, starts, chunk_prefixes, done or [0], at or [0]
            )
        except Exception as e:
            self.fused_fallbacks += 1
            if self.fused_fallbacks == 1 or self.fused_fallbacks % 1000 == 0:
                log.warning("a step's one forward failed (%d so far), running it as two: %r", self.fused_fallbacks, e)
            self._decode()
            return self._prefill(chunks)
        for seq in decoding:
            seq.length += 1
        self._emit_decoded(decoding, logits)
        return self._emit_prefilled(prefilling, self._advance(prefilling, chunks, done, chunk_logits))

    # --- prefill: chunks of waiting prompts, batched ---------------------------------------------
    def _prefill(self, chunks: list[int]) -> list[Sequence]:
        if not chunks:
            return []
        first = self.n_decoding
        rows = self.slots[first : first + len(chunks)]
        try:
            last_logits = self._prefill_forward(first, rows, chunks)
        except Exception:  # retry alone: only the rows that fail by themselves fail
            last_logits = {}
            for k, (seq, n) in enumerate(zip(rows, chunks)):
                try:
                    last_logits.update(self._prefill_forward(first + k, [seq], [n]))
                except Exception as e:
                    self._fail(seq, e)
        return self._emit_prefilled(rows, last_logits)

    def _emit_prefilled(self, rows: list[Sequence], last_logits: dict[Sequence, torch.Tensor]) -> list[Sequence]:
        """Rows whose prompt is done sample their first token and move into the decoding block."""
        for seq in rows:
            if seq.done or seq not in last_logits:
                continue
            try:
                token = sample_row(last_logits[seq], seq.params.temperature, seq.params.top_p, seq.generator)
            except Exception as e:
                self._fail(seq, e)
                continue
            self._swap(self.slots.index(seq), self.n_decoding)  # into the decoding block
            self.n_decoding += 1
            self._stacked = None
            self._emit(seq, token)
        return rows

    def _prefill_forward(self, first: int, rows: list[Sequence], chunks: list[int]) -> dict[Sequence, torch.Tensor]:
        """One forward over rows' next chunks (right-padded to the widest; the padding's keys land
        beyond each row's length, never attended to, overwritten later). Returns the last logits
        of the rows whose prompt this completes."""
        tokens, starts, prefixes, done, at = self._chunk_inputs(rows, chunks)
        # No row completes: the pass still fills the caches; one row's logits are computed and unused.
        logits = self.decoder.chunk(first, tokens, starts, prefixes, done or [0], at or [0])
        return self._advance(rows, chunks, done, logits)

    def _chunk_inputs(self, rows: list[Sequence], chunks: list[int]):
        """The rows' next chunks as one right-padded (B, width) batch, their start slots, their
        prefixes, and which rows this chunk completes (with the index of their last token)."""
        tokens = torch.zeros(len(rows), max(chunks), dtype=torch.long)
        for b, (seq, n) in enumerate(zip(rows, chunks)):
            tokens[b, :n] = torch.tensor(seq.prompt[seq.length : seq.length + n])
        prefixes = stack_prefixes([s.prefixes for s in rows]) if any(s.prefixes for s in rows) else {}
        done = [b for b, (seq, n) in enumerate(zip(rows, chunks)) if seq.length + n == len(seq.prompt)]
        return tokens, [s.length for s in rows], prefixes, done, [chunks[b] - 1 for b in done]

    @staticmethod
    def _advance(rows: list[Sequence], chunks: list[int], done: list[int], logits: torch.Tensor) -> dict:
        """After a chunk's forward: the rows' cache fill moves on; the completed rows' last logits."""
        for seq, n in zip(rows, chunks):
            seq.length += n
        return {rows[b]: logits[k] for k, b in enumerate(done)}

    # --- decode: one token for every decoding row ----------------------------------------------
    def _decode(self) -> None:
        rows = self.slots[: self.n_decoding]
        try:
            logits = self._forward(0, len(rows))
        except Exception:  # retry alone: only the rows that fail by themselves fail
            for i, seq in enumerate(rows):
                try:
                    self._sample_and_emit(seq, self._forward(i, i + 1, alone=True)[0], len(rows))
                except Exception as e:
                    self._fail(seq, e)
            return
        self._emit_decoded(rows, logits)

    def _emit_decoded(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()  # one host sync for every greedy row
        for i, seq in enumerate(rows):
            try:
                self._sample_and_emit(seq, logits[i], len(rows), greedy[i])
            except Exception as e:
                self._fail(seq, e)

    def _forward(self, first: int, stop: int, alone: bool = False) -> torch.Tensor:
        rows = self.slots[first:stop]
        tokens, positions = [s.last for s in rows], [s.length for s in rows]
        if alone:
            prefixes = stack_prefixes([rows[0].prefixes]) if rows[0].prefixes else {}
        else:
            # Fill the batch up to its bucket (compiled decode: shapes repeat) with scratch rows at
            # a free position of their slot (a prefilling row's next slot; 0 in an empty slot).
            spare = self.decoder.bucket(len(rows)) - len(rows)
            fill = self.slots[stop : stop + spare]
            tokens += [0] * spare
            positions += [s.length for s in fill] + [0] * (spare - len(fill))
            prefixes = self._decoding_prefixes(rows, spare)
        logits = self.decoder(first, tokens, positions, prefixes)[: len(rows)]
        for s in rows:
            s.length += 1
        return logits

    def _decoding_prefixes(self, rows: list[Sequence], spare: int) -> dict[int, PromptKV]:
        """The decoding rows' prefixes stacked (plus `spare` empty rows), kept until the block changes."""
        if self._stacked is None or len(self._stacked_rows) != len(rows) + spare:
            self._stacked_rows = [s.prefixes for s in rows] + [None] * spare
            self._stacked = stack_prefixes(self._stacked_rows)
        return self._stacked

    def _sample_and_emit(self, seq: Sequence, logits: torch.Tensor, batch: int, greedy: int | None = None) -> None:
        seq.max_batch = max(seq.max_batch, batch)
        if seq.done:
            return
        if seq.params.temperature == 0 and greedy is not None:
            self._emit(seq, greedy)
        else:
            self._emit(seq, sample_row(logits, seq.params.temperature, seq.params.top_p, seq.generator))

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.max_batch = max(seq.max_batch, self.n_decoding)
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
            if seq.finish_reason is None:  # counted first: a reader that sees `done` sees the count
                self.finished[reason] = self.finished.get(reason, 0) + 1
                seq.finish_reason = reason

    def fail_running(self, e: BaseException) -> list[Sequence]:
        """After a step raised outside the per-row handling: fail every row in a slot, free the slots."""
        rows = list(self.slots)
        for seq in rows:
            self._fail(seq, e)
        self.slots.clear()
        self.n_decoding = 0
        self._stacked = None
        return rows

    def stats(self) -> dict:
        with self.lock:
            return {
                "running": self.n_decoding,
                "prefilling": len(self.slots) - self.n_decoding,
                "waiting": len(self.waiting),
                "steps": self.steps,
                "finished": dict(self.finished),
                "max_running": self.max_running,
                "step_tokens": self.step_tokens,
                "compiled_decode": self.decoder.compiled,
                "fused_fallbacks": self.fused_fallbacks,
            }
