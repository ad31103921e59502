"""Continuous batching: one background asyncio loop owns one :class:`DecodeBatch`.

Requests arrive at any time with their prompt embeddings. Between two decode steps the loop
admits waiting requests into free cache rows (prefill), then advances every active row by one
token, and hands each token to the request's own ``asyncio.Queue``. A request that arrives
while others are half-way through joins them at the next step instead of waiting for the batch
to drain. The model runs in one worker thread so the replica's event loop keeps accepting
requests (and streaming tokens out) while a step computes.

No Ray here: the loop is plain asyncio + torch and is tested on its own.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from model.engine import DecodeBatch, SamplingParams, TokenEvent

log = logging.getLogger(__name__)


class PromptTooLong(ValueError):
    """The prompt (text + image slots) leaves no room in the KV cache for a single new token."""


@dataclass
class Pending:
    """One request's handle: its token queue and the times the loop saw it."""

    request_id: str
    prompt_embeds: torch.Tensor
    params: SamplingParams
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    finished_at: float | None = None


class DecodeLoop:
    """Owns a :class:`DecodeBatch`; :meth:`submit` returns a :class:`Pending` whose queue yields
    :class:`TokenEvent` objects (the last one has ``finished=True``) or one exception."""

    def __init__(self, model, eos_id: int, capacity: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._make_batch = lambda: DecodeBatch(model, capacity, max_len, eos_id, device, dtype)
        self.batch = self._make_batch()
        self.capacity = capacity
        self._waiting: collections.deque[Pending] = collections.deque()
        self._running: dict[str, Pending] = {}
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-loop")
        self.stats = {"submitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0,
                      "tokens": 0, "max_active": 0, "joined_running_batch": 0}

    @property
    def max_len(self) -> int:
        return self.batch.max_len

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the background loop on the running event loop (idempotent)."""
        if self.alive:
            return
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="decode-loop")

    def submit(self, prompt_embeds: torch.Tensor, params: SamplingParams) -> Pending:
        """Queue a request; it joins the running batch at the next step with a free row."""
        self.start()
        params.validate()
        if prompt_embeds.shape[0] + 1 >= self.max_len:
            raise PromptTooLong(
                f"the prompt has {prompt_embeds.shape[0]} tokens (text + image slots) but the decoder's "
                f"KV cache holds {self.max_len}; use a smaller resolution mode or a shorter prompt")
        pending = Pending(f"r{next(self._ids)}", prompt_embeds, params)
        self._waiting.append(pending)
        self.stats["submitted"] += 1
        self._wake.set()
        return pending

    def cancel(self, pending: Pending) -> None:
        """Stop generating for a request (client gone, timeout); its row frees at the next step."""
        if pending.finished_at is not None:
            return
        try:
            self._waiting.remove(pending)
            pending.finished_at = time.perf_counter()
            self.stats["cancelled"] += 1
            return
        except ValueError:
            pass
        if pending.request_id in self._running:
            self._cancelled.add(pending.request_id)
            if self._wake is not None:
                self._wake.set()

    def snapshot(self) -> dict:
        return {**self.stats, "active": self.batch.active, "waiting": len(self._waiting),
                "capacity": self.capacity, "max_len": self.max_len, "alive": self.alive}

    # ------------------------------------------------------------------ the loop
    def _advance(self, admit: list[Pending], cancelled: set[str]) -> list[TokenEvent]:
        """One round in the worker thread: drop cancelled rows, prefill newcomers, one step."""
        self.batch.drop(cancelled)  # the slot's cache is reset when a new request takes it
        events = self.batch.add([(p.request_id, p.prompt_embeds, p.params) for p in admit]) if admit else []
        if self.batch.active:
            events += self.batch.step()
        return events

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self.batch.active:
                self._cancelled.clear()
                self._wake.clear()
                await self._wake.wait()
                continue
            admit: list[Pending] = []
            free = len(self.batch.free_rows())
            while self._waiting and len(admit) < free:
                admit.append(self._waiting.popleft())
            if admit and self.batch.active:
                self.stats["joined_running_batch"] += len(admit)
            cancelled, self._cancelled = self._cancelled, set()
            now = time.perf_counter()
            for p in admit:
                p.admitted_at = now
                self._running[p.request_id] = p
            for rid in cancelled:
                p = self._running.pop(rid, None)
                if p is not None:
                    p.finished_at = now
                    self.stats["cancelled"] += 1
            try:
                events = await loop.run_in_executor(self._executor, self._advance, admit, cancelled)
            except Exception as exc:  # a failed forward poisons every row: fail them and start clean
                log.exception("decode step failed; failing %d request(s)", len(self._running))
                self._fail_all(exc)
                continue
            self.stats["steps"] += 1
            self.stats["max_active"] = max(self.stats["max_active"], self.batch.active + sum(e.finished for e in events))
            self._dispatch(events)

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for ev in events:
            p = self._running.get(ev.request_id)
            if p is None:  # cancelled while the step ran
                continue
            self.stats["tokens"] += 1
            if ev.finished:
                del self._running[ev.request_id]
                p.finished_at = now
                self.stats["finished"] += 1
            p.queue.put_nowait(ev)

    def _fail_all(self, exc: Exception) -> None:
        now = time.perf_counter()
        for p in self._running.values():
            p.finished_at = now
            p.queue.put_nowait(exc)
            self.stats["failed"] += 1
        self._running.clear()
        self.batch = self._make_batch()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)


class Detokenizer:
    """Token ids -> text deltas without re-decoding the whole output at every token.

    Keeps a short window (vLLM's prefix/read offsets) and holds back a partial UTF-8 character
    until it completes. :meth:`finish` returns the remainder so that the concatenated deltas
    equal ``tokenizer.decode(all_ids)``, the non-streamed text.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def finish(self) -> tuple[str, str]:
        """(last delta, full text); the full text is exact even if a window decoded differently."""
        full = self.tokenizer.decode(self.ids)
        if full.startswith(self.text):
            delta = full[len(self.text):]
        else:  # should not happen with byte-level BPE; never emit text that contradicts the result
            log.warning("incremental detokenization diverged from the full decode")
            delta = ""
        self.text = full
        return delta, full
