"""``TextDecoder``: vision embeddings + prompt -> tokens, continuously batched.

The ingress passes the encoder's ``DeploymentResponse`` objects straight in as positional
arguments, so Ray resolves them here and the embeddings travel encoder -> object store ->
decoder, never through the ingress. Both entry points share one path:

- :meth:`generate` returns the whole result (``/v1/ocr``, non-streamed chat);
- :meth:`stream` yields ``{"type": "delta"}`` events, then ``{"type": "done"}`` (streamed chat).

Errors a client caused (prompt too long, wrong number of ``<image>``) come back as
``{"type": "error", "error": {...}}`` values, not exceptions, so the ingress can answer 4xx.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

import ray
import torch
from ray import serve

from model.engine import SamplingParams
from serve.checkpoints import load_part, resolve_device, resolve_dtype
from serve.decode_loop import DecodeLoop, Detokenizer, PromptTooLong

log = logging.getLogger("ray.serve")

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")


def _error(type: str, message: str, status: int = 400) -> dict:
    return {"type": "error", "status": status, "error": {"type": type, "message": message}}


@serve.deployment(name="TextDecoder")
class TextDecoder:
    """One replica = one model copy + one :class:`DecodeLoop` (``max_batch_size`` rows)."""

    def __init__(self, checkpoint: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 32,
                 max_seq_len: int | None = None, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, self.tokenizer, meta = load_part(checkpoint, "language", self.device, self.dtype)
        max_len = int(max_seq_len or self.model.config.gpt.sequence_len)
        self.loop = DecodeLoop(self.model, self.tokenizer.eos_id, int(max_batch_size), max_len, self.device, self.dtype)
        self.whitelist = frozenset(self._token_ids(("<td>", "</td>")))
        self.checkpoint = checkpoint
        log.info("TextDecoder ready: %s on %s/%s, %d rows x %d tokens", checkpoint, self.device, self.dtype,
                 max_batch_size, self.loop.max_len)

    def _token_ids(self, names) -> list[int]:
        ids = []
        for name in names:  # n-gram blocking never bans table cells (the reference's whitelist)
            try:
                ids.append(self.tokenizer.token_id(name))
            except KeyError:
                pass
        return ids

    async def check_health(self) -> None:
        """Serve replaces the replica when the decode loop has died."""
        if self.loop._task is not None and not self.loop.alive:
            raise RuntimeError("the decode loop stopped")

    def get_stats(self) -> dict:
        return {"replica": ray.get_runtime_context().get_actor_name(), **self.loop.snapshot()}

    # ------------------------------------------------------------------ request path
    def _params(self, request: dict) -> SamplingParams:
        raw = request.get("params") or {}
        kwargs = {k: raw[k] for k in SAMPLING_KEYS if raw.get(k) is not None}
        return SamplingParams(whitelist_ids=self.whitelist, **kwargs)

    def _prompt_embeds(self, prompt: str, vision: list[torch.Tensor]) -> torch.Tensor:
        counts = [v.shape[0] for v in vision]
        ids = self.tokenizer.render_vision_prompt(prompt, counts)
        with torch.inference_mode():
            ids_t = torch.tensor([ids], device=self.device)
            return self.model.merge_embeddings(ids_t, [v.to(self.device, self.dtype) for v in vision])[0]

    async def _events(self, request: dict, vision: tuple[dict, ...]) -> AsyncIterator[dict]:
        start = time.perf_counter()
        embeds = [v["embeds"] for v in vision]
        try:
            params = self._params(request)
            params.validate()
            prompt_embeds = self._prompt_embeds(request["prompt"], embeds)
            pending = self.loop.submit(prompt_embeds, params)
        except PromptTooLong as exc:
            yield _error("prompt_too_long", str(exc))
            return
        except (ValueError, TypeError) as exc:  # <image> count mismatch, bad sampling values
            yield _error("invalid_request", str(exc))
            return
        detok = Detokenizer(self.tokenizer)
        finish_reason = "length"
        try:
            while True:
                ev = await pending.queue.get()
                if isinstance(ev, Exception):
                    yield _error("decode_failed", f"generation failed: {ev}", 500)
                    return
                if ev.finish_reason != "stop":  # the stop token is not part of the text
                    delta = detok.push(ev.token_id)
                    if delta:
                        yield {"type": "delta", "text": delta}
                if ev.finished:
                    finish_reason = ev.finish_reason or finish_reason
                    break
        finally:
            self.loop.cancel(pending)  # no-op when finished; frees the row when the caller went away
        last, full = detok.finish()
        if last:
            yield {"type": "delta", "text": last}
        admitted = pending.admitted_at or pending.submitted_at
        finished = pending.finished_at or time.perf_counter()
        encode_ms = max((float(v.get("encode_ms", 0.0)) for v in vision), default=0.0)
        yield {
            "type": "done",
            "text": full,
            "finish_reason": finish_reason,
            "usage": {"prompt_tokens": int(prompt_embeds.shape[0]),
                      "image_tokens": int(sum(e.shape[0] for e in embeds)),
                      "output_tokens": len(detok.ids)},
            "timings": {"encode_ms": round(encode_ms, 3),
                        "encode_batch_size": max((int(v.get("batch_size", 1)) for v in vision), default=0),
                        "prefill_prep_ms": round((pending.submitted_at - start) * 1000, 3),
                        "queue_ms": round((admitted - pending.submitted_at) * 1000, 3),
                        "decode_ms": round((finished - admitted) * 1000, 3)},
        }

    async def generate(self, request: dict, *vision: dict) -> dict:
        """The finished result (``type`` "done") or an error event."""
        result: dict[str, Any] = {}
        async for event in self._events(request, vision):
            if event["type"] in ("done", "error"):
                result = event
        return result

    async def stream(self, request: dict, *vision: dict) -> AsyncIterator[dict]:
        """Deltas as tokens arrive, then the "done" event (or an error event)."""
        async for event in self._events(request, vision):
            yield event
