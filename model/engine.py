"""Batched generation: vision encoded once at prefill, a preallocated KV cache with a row per
request, per-row positions, sampling, the reference's windowed n-gram blocker, and streaming.

:class:`DecodeBatch` is the continuous-batching core: requests are prefilled into free cache
rows whenever they arrive and every :meth:`DecodeBatch.step` advances all active rows by one
token, so Serve's decoder can admit new requests between decode steps. :class:`Engine` wraps
it for the common cases (``generate`` and ``stream`` over a list of requests).

On CUDA the defaults are the fast paths: bf16 weights, prefill through causal flash attention,
and decoding through :class:`model.gpt.GraphedDecoder` (one CUDA-graph replay per step, greedy
argmax and the n-gram blocker on the device, one small device-to-host copy of the chosen token
ids per step for stop detection and events; with greedy rows the next steps are queued before
the host reads a step's tokens). The CPU runs the plain path, token for token as
before. In bf16 the fast path rounds differently from the eager one, so greedy outputs agree
except where two logits nearly tie.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence

import torch

from model.gpt import GraphedDecoder, KVCache
from model.ngram import banned_ngram_tokens, block_ngrams, shift_in
from model.vlm import ImageViews, NanoDeepseekOCR


@dataclass
class SamplingParams:
    """How to pick tokens. Defaults are the reference's OCR decoding: greedy + n-gram blocking."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    ngram_size: int = 30  # 0 disables the blocker
    ngram_window: int = 90
    whitelist_ids: frozenset[int] = frozenset()  # tokens the blocker never bans (<td>, </td>)
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's end token
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.ngram_size < 0 or self.ngram_window < 1:
            raise ValueError("ngram_size must be >= 0 and ngram_window >= 1")


@dataclass
class GenerationRequest:
    """A prompt (with one ``<image>`` per image) and its images, or pre-encoded vision embeddings."""

    prompt: str
    images: Sequence[ImageViews] = ()
    vision_embeds: Sequence[torch.Tensor] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    image_tokens: int
    seconds: float


DEFAULT_NGRAM = (SamplingParams.ngram_size, SamplingParams.ngram_window)  # the reference's blocker


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """One token from a [V] logits row."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class TokenEvent:
    """One generated token of one request (``finished`` on its last token)."""

    request_id: object
    token_id: int
    finished: bool
    finish_reason: str | None = None


@dataclass
class _Row:
    request_id: object
    params: SamplingParams
    stop_ids: frozenset[int]
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class _Launched(NamedTuple):
    """A decode step queued on the GPU: the rows it was launched for, whether any of them needs
    the host's choice (then ``host`` is None), and the pinned buffer its tokens are copied into."""
    snapshot: list[tuple[int, _Row]]
    special: bool
    event: torch.cuda.Event | None
    host: torch.Tensor | None


class DecodeBatch:
    """A fixed-capacity set of KV-cache rows that requests join and leave between steps.

    ``fast`` (default: on CUDA) decodes through a :class:`GraphedDecoder` captured for this
    batch's cache; otherwise every step runs ``GPT.forward`` and picks tokens on the host.
    """

    def __init__(self, model: NanoDeepseekOCR, capacity: int, max_len: int, eos_id: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 fast: bool | None = None, graph_ngram: tuple[int, int] | None = DEFAULT_NGRAM) -> None:
        """``graph_ngram`` = (n, window): requests with exactly these n-gram blocker settings
        (the defaults) are blocked inside the decode graph; others on the device between steps."""
        self.model = model
        self.device = torch.device(device) if device is not None else model.image_newline.device
        self.dtype = dtype or model.gpt.lm_head.weight.dtype
        self.capacity = capacity
        self.max_len = min(max_len, model.gpt.rotary_len)
        self.eos_id = eos_id
        self.cache = KVCache(model.config.gpt, capacity, self.max_len, self.device, self.dtype)
        self.rows: dict[int, _Row] = {}
        self.lengths = [0] * capacity  # host copy of each active row's cache length (no syncs)
        self.next_token = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.fast = self.device.type == "cuda" if fast is None else fast
        self.decoder = GraphedDecoder(model.gpt, self.cache, ngram=graph_ngram) if self.fast else None
        self.history: torch.Tensor | None = None  # fast path: [capacity, W] recent tokens per row
        self._whitelists: dict[frozenset[int], torch.Tensor] = {}
        # fast path: launched steps whose tokens the host has not read yet, oldest first (see _step_fast)
        self._inflight: deque[_Launched] = deque()
        self._host_tokens = torch.zeros(self.AHEAD + 1, capacity, dtype=torch.long,
                                        pin_memory=self.device.type == "cuda") if self.fast else None
        self._launches = 0

    @property
    def active(self) -> int:
        return len(self.rows)

    def free_rows(self) -> list[int]:
        return [r for r in range(self.capacity) if r not in self.rows]

    def drop(self, request_ids: set) -> int:
        """Stop the rows of these requests (cancelled ones) and free their slots; how many were
        dropped. On the fast path the rows also stop decoding on the device: before, a dropped
        row kept running there, past its budget, until a new request took its slot."""
        slots = [slot for slot, row in self.rows.items() if row.request_id in request_ids]
        for slot in slots:
            del self.rows[slot]
        if slots and self.decoder is not None:
            self.decoder.active[torch.tensor(slots, device=self.device)] = False
        return len(slots)

    # ------------------------------------------------------------ host path
    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        p = row.params
        if p.ngram_size:
            banned = banned_ngram_tokens(row.generated, p.ngram_size, p.ngram_window) - p.whitelist_ids
            if banned:
                logits = logits.clone()
                logits[list(banned)] = float("-inf")
        return sample(logits, p, row.generator)

    def _emit(self, slot: int, logits: torch.Tensor) -> TokenEvent:
        return self._record(slot, self._choose(self.rows[slot], logits))

    def _record(self, slot: int, token: int) -> TokenEvent:
        """Append ``token`` to the row and decide whether the row is done."""
        row = self.rows[slot]
        row.generated.append(token)
        reason = None
        if token in row.stop_ids:
            reason = "stop"
        elif len(row.generated) >= row.params.max_new_tokens or self.lengths[slot] + 1 >= self.max_len:
            reason = "length"
        event = TokenEvent(row.request_id, token, reason is not None, reason)
        if reason is not None:
            del self.rows[slot]
        elif not self.fast:
            self.next_token[slot] = token
        return event

    # ---------------------------------------------------------- device path
    def _history_for(self, window: int) -> torch.Tensor:
        if self.history is None or self.history.shape[1] < window:
            grown = torch.full((self.capacity, window), -1, dtype=torch.long, device=self.device)
            if self.history is not None:
                grown[:, window - self.history.shape[1]:] = self.history
            self.history = grown
        return self.history

    def _choose_on_device(self, slots: list[int], logits: torch.Tensor) -> torch.Tensor:
        """Token ids [len(slots)] (on the device) for rows ``slots`` given their logits rows.

        Greedy argmax for all; rows with n-gram blocking get their bans applied on the device
        (grouped by their blocker settings); sampling rows are drawn on the host.
        """
        chosen = logits.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        sampled = []
        for i, slot in enumerate(slots):
            p = self.rows[slot].params
            if self._host_ngram(p):
                groups.setdefault((p.ngram_size, p.ngram_window, p.whitelist_ids), []).append(i)
            if p.temperature > 0:
                sampled.append(i)
        if not groups and not sampled:
            return chosen
        logits = logits.clone() if groups else logits
        for (n, window, whitelist), members in groups.items():
            idx = torch.tensor(members, device=self.device)
            rows = torch.tensor([slots[i] for i in members], device=self.device)
            hist = self._history_for(window)[rows][:, -window:]
            if whitelist and whitelist not in self._whitelists:
                self._whitelists[whitelist] = torch.tensor(sorted(whitelist), device=self.device)
            blocked = block_ngrams(logits[idx], hist, n, self._whitelists.get(whitelist))
            logits[idx] = blocked
            chosen[idx] = blocked.argmax(dim=-1)
        for i in sampled:
            row = self.rows[slots[i]]
            chosen[i] = sample(logits[i].float().cpu(), row.params, row.generator)
        return chosen

    def _remember(self, slots: list[int], tokens: torch.Tensor) -> None:
        """Shift the chosen tokens into the n-gram history of rows that block n-grams."""
        if self.history is None:
            return
        keep = [i for i, s in enumerate(slots) if s in self.rows and self._host_ngram(self.rows[s].params)]
        if not keep:
            return
        rows = torch.tensor([slots[i] for i in keep], device=self.device)
        self.history[rows] = shift_in(self.history[rows], tokens[torch.tensor(keep, device=self.device)])

    # --------------------------------------------------------------- public
    @torch.inference_mode()
    def add(self, prompts: Sequence[tuple[object, torch.Tensor, SamplingParams]]) -> list[TokenEvent]:
        """Prefill ``(request_id, prompt_embeds [L, C], params)`` into free rows; first tokens out."""
        free = self.free_rows()
        if len(prompts) > len(free):
            raise RuntimeError(f"{len(prompts)} requests but only {len(free)} free rows")
        if not prompts:
            return []
        lengths = [e.shape[0] for _, e, _ in prompts]
        for (rid, _, p), n in zip(prompts, lengths):
            p.validate()
            if n + 1 >= self.max_len:
                raise ValueError(f"request {rid!r}: prompt of {n} tokens does not fit the {self.max_len}-token cache")
        T, C = max(lengths), prompts[0][1].shape[1]
        embeds = torch.zeros(len(prompts), T, C, device=self.device, dtype=self.dtype)
        for i, (_, e, _) in enumerate(prompts):
            embeds[i, :e.shape[0]] = e.to(self.device, self.dtype)
        slot_list = free[:len(prompts)]
        slots = torch.tensor(slot_list, device=self.device)
        positions = torch.arange(T, device=self.device)[None].expand(len(prompts), T)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.gpt(inputs_embeds=embeds, positions=positions, kv_cache=self.cache,
                                cache_rows=slots, logits_rows=last)[:, 0]
        self.cache.lengths[slots] = last + 1  # padding beyond each prompt stays masked
        for i, (rid, _, p) in enumerate(prompts):
            slot = slot_list[i]
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device="cpu").manual_seed(p.seed)
            stop = p.stop_ids if p.stop_ids is not None else frozenset({self.eos_id})
            self.rows[slot] = _Row(rid, p, stop, generator=gen)
            self.lengths[slot] = lengths[i]
        if not self.fast:
            return [self._emit(slot, logits[i].float().cpu()) for i, slot in enumerate(slot_list)]
        if self.history is not None:
            self.history[slots] = -1
        host_blocked = [p.ngram_window for _, _, p in prompts if self._host_ngram(p)]
        if host_blocked:
            self._history_for(max(host_blocked))
        tokens = self._choose_on_device(slot_list, logits)
        self._remember(slot_list, tokens)
        dec = self.decoder
        dec.tokens[slots] = tokens
        events = [self._record(slot, t) for slot, t in zip(slot_list, tokens.tolist())]
        if dec.ngram is not None:  # the graph's blocker: on for these rows, its history the first token
            in_graph = [slot in self.rows and self._in_graph_ngram(p) for slot, (_, _, p) in zip(slot_list, prompts)]
            dec.ngram_rows[slots] = torch.tensor(in_graph, device=self.device)
            dec.history[slots] = -1
            dec.history[slots, -1] = tokens
            dec.ngram_whitelist[slots] = False
            vocab = dec.ngram_whitelist.shape[1]
            pairs = [(slot, t) for slot, (_, _, p), on in zip(slot_list, prompts, in_graph) if on
                     for t in p.whitelist_ids if 0 <= t < vocab]  # others can never be generated
            if pairs:  # one indexed write for every joining row
                dec.ngram_whitelist[tuple(torch.tensor(pairs, device=self.device).T)] = True
        started = [s for s in slot_list if s in self.rows]
        if started:
            dec.active[torch.tensor(started, device=self.device)] = True
        return events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every active row by one token."""
        if not self.rows:
            return []
        if self.fast:
            return self._step_fast()
        positions = self.cache.lengths.clone()
        inactive = [r for r in range(self.capacity) if r not in self.rows]
        if inactive:  # idle rows run a dummy token at position 0; their slot is reset on reuse
            positions[inactive] = 0
        logits = self.model.gpt(self.next_token[:, None], positions=positions[:, None],
                                kv_cache=self.cache)[:, 0].float().cpu()
        events = []
        for slot in sorted(self.rows):
            self.lengths[slot] += 1
            events.append(self._emit(slot, logits[slot]))
        return events

    def _in_graph_ngram(self, p: SamplingParams) -> bool:
        """The decode graph applies this greedy request's n-gram blocker itself (the settings it was
        built for). A sampling row's blocker stays on the host: its token is not the graph's argmax."""
        return (bool(p.ngram_size) and p.temperature == 0 and self.decoder is not None
                and self.decoder.ngram == (p.ngram_size, p.ngram_window))

    def _host_ngram(self, p: SamplingParams) -> bool:
        """This request's n-gram blocker runs between steps (settings other than the graph's)."""
        return bool(p.ngram_size) and not self._in_graph_ngram(p)

    def _special(self, row: _Row) -> bool:
        """The host must choose this row's tokens after each step (sampling, or a blocker outside the graph)."""
        return self._host_ngram(row.params) or row.params.temperature > 0

    # Steps queued on the GPU beyond the one the host is reading when every row is greedy: with
    # one, the GPU idles from a step's end until the host has woken, read its tokens and launched
    # the next (~35 us, 7% of a batch-1 step on an H200); with two it always has the next queued.
    AHEAD = 2

    def _launch(self) -> None:
        """Queue one decode step for the rows active now, and the copy of its tokens to the host."""
        snapshot = [(slot, self.rows[slot]) for slot in sorted(self.rows)]
        special = any(self._special(row) for _, row in snapshot)
        self.decoder.ngram_on = any(self._in_graph_ngram(row.params) for _, row in snapshot)
        self.decoder.step()
        event, host = None, None
        if not special:  # greedy rows: the graph's argmax is final, fetch it without waiting
            host = self._host_tokens[self._launches % len(self._host_tokens)]  # a buffer per step in flight
            host.copy_(self.decoder.tokens, non_blocking=True)
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        self._launches += 1
        self._inflight.append(_Launched(snapshot, special, event, host))

    def _all_greedy(self) -> bool:
        return bool(self.rows) and not any(self._special(r) for r in self.rows.values())

    def _step_fast(self) -> list[TokenEvent]:
        """One graph replay per step. When no row needs the host's choice (greedy rows, with no
        n-gram blocker or the graph's own), up to AHEAD steps are queued before this one's tokens
        are handled on the host, so the GPU does not wait for Python: rows that finish now are
        computed up to AHEAD more times and ignored (a row past the cache's end computes at
        position 0, see GraphedDecoder), and rows added in between join at the next step launched."""
        while self._inflight and not any(self.rows.get(s) is r for s, r in self._inflight[0].snapshot):
            self._inflight.popleft()  # launched for rows that have all finished since
        if not self._inflight:
            self._launch()
        snapshot, special, event, host = self._inflight.popleft()
        dec = self.decoder
        if special:
            live = [s for s, r in snapshot if self.rows.get(s) is r and self._special(r)]
            if live:
                rows = torch.tensor(live, device=self.device)
                tokens = self._choose_on_device(live, dec.logits[rows])
                dec.tokens[rows] = tokens
                self._remember(live, tokens)
            chosen = dec.tokens.tolist()  # the step's one host sync
        else:
            if event is not None:
                event.synchronize()
            chosen = host.tolist()
            while len(self._inflight) < self.AHEAD and self._all_greedy():
                self._launch()  # the next steps run while the host handles this one
        events, finished = [], []
        for slot, row in snapshot:
            if self.rows.get(slot) is not row:
                continue  # finished (or replaced) since this step was launched
            self.lengths[slot] += 1
            events.append(self._record(slot, chosen[slot]))
            if events[-1].finished:
                finished.append(slot)
        if finished:
            dec.active[torch.tensor(finished, device=self.device)] = False
        return events


class Engine:
    """Generation for lists of requests on one model (see the module docstring)."""

    def __init__(self, model: NanoDeepseekOCR, tokenizer, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, fast: bool | None = None, encode_batch: int = 8,
                 compile_encoder: bool | None = None) -> None:
        """``dtype`` defaults to bf16 on CUDA (the model is cast in place) and to the model's own
        dtype elsewhere; ``fast`` (default: on CUDA) selects the graphed decode path;
        ``encode_batch`` bounds the images the vision encoder takes at once (memory);
        ``compile_encoder`` (default: on CUDA with the fast path) compiles SAM and CLIP with static
        chunks of ``encode_batch`` views (:meth:`NanoDeepseekOCR.compile_vision`): about 2x
        faster vision on an H100, after a compile of about a minute per view size on first use
        (a Serve replica pays it on its warm-up request)."""
        self.device = torch.device(device) if device is not None else model.image_newline.device
        if dtype is None and self.device.type == "cuda":
            dtype = torch.bfloat16
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.fast = self.device.type == "cuda" if fast is None else fast
        self.encode_batch = max(1, encode_batch)
        if compile_encoder is None:
            compile_encoder = self.fast and self.device.type == "cuda"
        self.compile_encoder = compile_encoder
        if self.compile_encoder:
            self.model.compile_vision(self.encode_batch)
        self._batch: DecodeBatch | None = None  # kept between calls on the fast path (graph + cache)

    # ------------------------------------------------------------ building
    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageViews]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for i in range(0, len(images), self.encode_batch):
            out.extend(self.model.encode_images([im.to(self.device) for im in images[i:i + self.encode_batch]]))
        return out

    @torch.inference_mode()
    def prompt_embeds(self, prompt: str, vision: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """[L, C] embeddings of BOS + prompt with its ``<image>`` slots filled."""
        counts = [v.shape[0] for v in vision]
        ids = self.tokenizer.render_vision_prompt(prompt, counts)
        ids_t = torch.tensor([ids], device=self.device)
        return self.model.merge_embeddings(ids_t, [v.to(self.device) for v in vision])[0], len(ids)

    def _prepare(self, requests: Sequence[GenerationRequest]):
        needs = [i for i, r in enumerate(requests) if r.vision_embeds is None and r.images]
        flat = [im for i in needs for im in requests[i].images]
        encoded = self.encode_images(flat) if flat else []
        prepared, k = [], 0
        for i, r in enumerate(requests):
            if r.vision_embeds is not None:
                vision = list(r.vision_embeds)
            else:
                vision = encoded[k:k + len(r.images)]
                k += len(r.images)
            embeds, n_prompt = self.prompt_embeds(r.prompt, vision)
            prepared.append((embeds, n_prompt, sum(v.shape[0] for v in vision)))
        return prepared

    def _decode_batch(self, capacity: int, max_len: int) -> DecodeBatch:
        """A DecodeBatch for ``capacity`` rows of ``max_len``; the fast path reuses its last one
        (cache and captured graph) when it is idle and large enough."""
        dtype = self.dtype or self.model.gpt.lm_head.weight.dtype
        b = self._batch
        if b is not None and not b.active and b.capacity == capacity and b.max_len >= max_len:
            return b
        self._batch = None  # free the old cache before allocating the new one
        batch = DecodeBatch(self.model, capacity, max_len, self.tokenizer.eos_id, self.device, dtype, fast=self.fast)
        if self.fast:
            self._batch = batch
        return batch

    # ---------------------------------------------------------- generation
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, str, TokenEvent]]:
        """Yield ``(request_index, text_delta, event)`` as tokens are generated."""
        prepared = self._prepare(requests)
        max_len = max(e.shape[0] + r.params.max_new_tokens for (e, _, _), r in zip(prepared, requests)) + 1
        batch = self._decode_batch(len(requests), max_len)
        tokens: list[list[int]] = [[] for _ in requests]
        texts = ["" for _ in requests]

        def deltas(events: list[TokenEvent]):
            for ev in events:
                i = ev.request_id
                if ev.finish_reason != "stop":  # the stop token is not part of the text
                    tokens[i].append(ev.token_id)
                text = self.tokenizer.decode(tokens[i], skip_special=False)
                if text.endswith("\ufffd") and not ev.finished:
                    yield i, "", ev  # hold back a partial UTF-8 character
                    continue
                delta, texts[i] = text[len(texts[i]):], text
                yield i, delta, ev

        yield from deltas(batch.add([(i, e, r.params) for i, ((e, _, _), r) in enumerate(zip(prepared, requests))]))
        while batch.active:
            yield from deltas(batch.step())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Run requests to completion together; greedy results equal running each alone."""
        start = time.perf_counter()
        prepared = self._prepare(requests)
        max_len = max(e.shape[0] + r.params.max_new_tokens for (e, _, _), r in zip(prepared, requests)) + 1
        batch = self._decode_batch(len(requests), max_len)
        tokens: list[list[int]] = [[] for _ in requests]
        reasons: list[str] = ["length" for _ in requests]
        events = batch.add([(i, e, r.params) for i, ((e, _, _), r) in enumerate(zip(prepared, requests))])
        while True:
            for ev in events:
                if ev.finish_reason == "stop":
                    reasons[ev.request_id] = "stop"
                else:
                    tokens[ev.request_id].append(ev.token_id)
            if not batch.active:
                break
            events = batch.step()
        seconds = time.perf_counter() - start
        return [
            GenerationResult(self.tokenizer.decode(t), t, reasons[i], prepared[i][1], prepared[i][2], seconds)
            for i, t in enumerate(tokens)
        ]

    def generate_one(self, prompt: str, images: Sequence[ImageViews] = (), **params) -> GenerationResult:
        return self.generate([GenerationRequest(prompt, images, params=SamplingParams(**params))])[0]
