"""Batched generation: vision encoded once at prefill, a preallocated KV cache with a row per
request, per-row positions, sampling, the reference's windowed n-gram blocker, and streaming.

:class:`DecodeBatch` is the continuous-batching core: requests are prefilled into free cache
rows whenever they arrive and every :meth:`DecodeBatch.step` advances all active rows by one
token, so Serve's decoder can admit new requests between decode steps. :class:`Engine` wraps
it for the common cases (``generate`` and ``stream`` over a list of requests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from model.gpt import KVCache
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


def banned_ngram_tokens(tokens: Sequence[int], n: int, window: int) -> set[int]:
    """Tokens that would repeat an n-gram seen in the last ``window`` generated tokens.

    The same rule as DeepSeek-OCR's no-repeat logits processor: take the last n-1 tokens as a
    prefix, find that prefix among the n-grams that start inside the window, ban what followed.
    """
    if n <= 0 or len(tokens) < n:
        return set()
    prefix = tuple(tokens[len(tokens) - (n - 1):]) if n > 1 else ()
    start = max(0, len(tokens) - window)
    banned = set()
    for i in range(start, len(tokens) - n + 1):
        if tuple(tokens[i:i + n - 1]) == prefix:
            banned.add(tokens[i + n - 1])
    return banned


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


class DecodeBatch:
    """A fixed-capacity set of KV-cache rows that requests join and leave between steps."""

    def __init__(self, model: NanoDeepseekOCR, capacity: int, max_len: int, eos_id: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else model.image_newline.device
        self.dtype = dtype or model.gpt.lm_head.weight.dtype
        self.capacity = capacity
        self.max_len = min(max_len, model.gpt.rotary_len)
        self.eos_id = eos_id
        self.cache = KVCache(model.config.gpt, capacity, self.max_len, self.device, self.dtype)
        self.rows: dict[int, _Row] = {}
        self.next_token = torch.zeros(capacity, dtype=torch.long, device=self.device)

    @property
    def active(self) -> int:
        return len(self.rows)

    def free_rows(self) -> list[int]:
        return [r for r in range(self.capacity) if r not in self.rows]

    def _choose(self, row: _Row, logits: torch.Tensor) -> int:
        p = row.params
        if p.ngram_size:
            banned = banned_ngram_tokens(row.generated, p.ngram_size, p.ngram_window) - p.whitelist_ids
            if banned:
                logits = logits.clone()
                logits[list(banned)] = float("-inf")
        return sample(logits, p, row.generator)

    def _emit(self, slot: int, logits: torch.Tensor) -> TokenEvent:
        row = self.rows[slot]
        token = self._choose(row, logits)
        row.generated.append(token)
        reason = None
        if token in row.stop_ids:
            reason = "stop"
        elif len(row.generated) >= row.params.max_new_tokens or int(self.cache.lengths[slot]) + 1 >= self.max_len:
            reason = "length"
        event = TokenEvent(row.request_id, token, reason is not None, reason)
        if reason is not None:
            del self.rows[slot]
        else:
            self.next_token[slot] = token
        return event

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
        slots = torch.tensor(free[:len(prompts)], device=self.device)
        positions = torch.arange(T, device=self.device)[None].expand(len(prompts), T)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.gpt(inputs_embeds=embeds, positions=positions, kv_cache=self.cache,
                                cache_rows=slots, logits_rows=last)[:, 0]
        self.cache.lengths[slots] = last + 1  # padding beyond each prompt stays masked
        events = []
        for i, (rid, _, p) in enumerate(prompts):
            slot = int(slots[i])
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device="cpu").manual_seed(p.seed)
            stop = p.stop_ids if p.stop_ids is not None else frozenset({self.eos_id})
            self.rows[slot] = _Row(rid, p, stop, generator=gen)
            events.append(self._emit(slot, logits[i].float().cpu()))
        return events

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every active row by one token."""
        if not self.rows:
            return []
        positions = self.cache.lengths.clone()
        inactive = [r for r in range(self.capacity) if r not in self.rows]
        if inactive:  # idle rows run a dummy token at position 0; their slot is reset on reuse
            positions[inactive] = 0
        logits = self.model.gpt(self.next_token[:, None], positions=positions[:, None],
                                kv_cache=self.cache)[:, 0].float().cpu()
        events = []
        for slot in sorted(self.rows):
            events.append(self._emit(slot, logits[slot]))
        return events


class Engine:
    """Generation for lists of requests on one model (see the module docstring)."""

    def __init__(self, model: NanoDeepseekOCR, tokenizer, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model.image_newline.device
        self.dtype = dtype

    # ------------------------------------------------------------ building
    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageViews]) -> list[torch.Tensor]:
        return self.model.encode_images([im.to(self.device) for im in images])

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

    # ---------------------------------------------------------- generation
    def stream(self, requests: Sequence[GenerationRequest]) -> Iterator[tuple[int, str, TokenEvent]]:
        """Yield ``(request_index, text_delta, event)`` as tokens are generated."""
        prepared = self._prepare(requests)
        max_len = max(e.shape[0] + r.params.max_new_tokens for (e, _, _), r in zip(prepared, requests)) + 1
        batch = DecodeBatch(self.model, len(requests), max_len, self.tokenizer.eos_id, self.device,
                            self.dtype or self.model.gpt.lm_head.weight.dtype)
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
        batch = DecodeBatch(self.model, len(requests), max_len, self.tokenizer.eos_id, self.device,
                            self.dtype or self.model.gpt.lm_head.weight.dtype)
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
