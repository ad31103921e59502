"""Engine: batched greedy == alone, streaming == whole, n-gram blocking, sampling controls."""

import numpy as np
import pytest
import torch

from model.engine import (DecodeBatch, Engine, GenerationRequest, SamplingParams, _Row, banned_ngram_tokens,
                          sample)
from model.vlm import ImageViews
from model.weights import load_checkpoint


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return Engine(model, tokenizer)


def _image(seed, size=512):
    return ImageViews.from_arrays(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), None)


def _requests(n=4, max_new=12):
    prompts = ["<image>\nFree OCR.", "<image>\n<|grounding|>Convert the document to markdown.",
               "<image>\nDescribe this image in detail.", "<image>\nFree OCR. The quick brown fox jumps"]
    return [GenerationRequest(prompts[i % 4], [_image(i)], params=SamplingParams(max_new_tokens=max_new, ngram_size=0))
            for i in range(n)]


def test_batched_greedy_equals_each_request_alone(engine):
    reqs = _requests()
    together = engine.generate(reqs)
    for r, t in zip(reqs, together):
        alone = engine.generate([r])[0]
        assert alone.token_ids == t.token_ids
        assert alone.text == t.text
    assert len({t.prompt_tokens for t in together}) > 1  # prompts really differ in length
    assert all(t.image_tokens == 73 for t in together)


def test_stream_reassembles_to_generate(engine):
    reqs = _requests(3)
    texts = ["", "", ""]
    finished = set()
    for i, delta, ev in engine.stream(reqs):
        texts[i] += delta
        if ev.finished:
            finished.add(i)
    assert finished == {0, 1, 2}
    assert texts == [r.text for r in engine.generate(reqs)]


def test_continuous_batching_admits_requests_between_steps(engine):
    model, tok = engine.model, engine.tokenizer
    reqs = _requests(3, max_new=8)
    embeds = [engine.prompt_embeds(r.prompt, engine.encode_images(r.images))[0] for r in reqs]
    batch = DecodeBatch(model, capacity=2, max_len=256, eos_id=tok.eos_id)
    out = _run_continuous(batch, embeds, [r.params for r in reqs])  # 1 joins mid-flight, 2 reuses a freed row
    for i, r in enumerate(reqs):
        alone = engine.generate([r])[0].token_ids
        got = [t for t in out[i] if t != tok.eos_id]
        assert got == alone, i


def _run_continuous(batch: DecodeBatch, embeds, params, join_after: int = 3) -> dict[int, list[int]]:
    """Request 0 alone, request 1 joins after ``join_after`` steps, request 2 takes the first row freed."""
    out: dict[int, list[int]] = {i: [] for i in range(len(embeds))}
    for ev in batch.add([(0, embeds[0], params[0])]):
        out[0].append(ev.token_id)
    for _ in range(join_after):
        for ev in batch.step():
            out[ev.request_id].append(ev.token_id)
    for ev in batch.add([(1, embeds[1], params[1])]):
        out[1].append(ev.token_id)
    while batch.active:
        for ev in batch.step():
            out[ev.request_id].append(ev.token_id)
            if ev.finished and batch.free_rows() and not out[2]:
                for e2 in batch.add([(2, embeds[2], params[2])]):
                    out[2].append(e2.token_id)
    return out


@pytest.mark.parametrize("near_cache_end", [False, True])
def test_graphed_decode_path_matches_host_path(engine, near_cache_end):
    """The fast path (GraphedDecoder with the torch ops on the CPU; steps queued ahead of the
    host) gives the host path's tokens while rows join, finish and are reused, including rows
    that finish at the end of the KV cache with steps for them already queued."""
    model, tok = engine.model, engine.tokenizer
    reqs = _requests(3, max_new=40 if near_cache_end else 8)
    embeds = [engine.prompt_embeds(r.prompt, engine.encode_images(r.images))[0] for r in reqs]
    max_len = max(e.shape[0] for e in embeds) + 6 if near_cache_end else 256
    outs = {}
    for fast in (False, True):
        batch = DecodeBatch(model, capacity=2, max_len=max_len, eos_id=tok.eos_id, fast=fast)
        assert (batch.decoder is not None) is fast
        outs[fast] = _run_continuous(batch, embeds, [r.params for r in reqs])
    assert outs[True] == outs[False]
    if near_cache_end:  # every row ran into the cache's end, not its token budget
        assert all(len(embeds[i]) + len(t) >= max_len - 1 for i, t in outs[True].items())


@pytest.mark.parametrize("other", ["other settings", "sampling"])
def test_ngram_blocker_in_the_decode_graph_matches_the_host_rule(engine, other):
    """Greedy requests with the graph's blocker settings are blocked inside the decode step (no
    host work per step); others (other settings, or sampling) between steps. All give the host
    path's tokens, which follow the reference rule, while rows join, finish and are reused, with
    a whitelist too."""
    model, tok = engine.model, engine.tokenizer
    reqs = _requests(3, max_new=40)
    embeds = [engine.prompt_embeds(r.prompt, engine.encode_images(r.images))[0] for r in reqs]
    in_graph = SamplingParams(max_new_tokens=40, ngram_size=3, ngram_window=20)
    outside = (SamplingParams(max_new_tokens=40, ngram_size=2, ngram_window=20) if other == "other settings" else
               SamplingParams(max_new_tokens=40, ngram_size=3, ngram_window=20, temperature=1.0, seed=7))
    params = [in_graph, outside,
              SamplingParams(max_new_tokens=40, ngram_size=3, ngram_window=20,
                             whitelist_ids=frozenset(range(40)) | {10 ** 9})]  # an id past the vocabulary too
    outs = {}
    for fast in (False, True):
        batch = DecodeBatch(model, capacity=2, max_len=512, eos_id=tok.eos_id, fast=fast, graph_ngram=(3, 20))
        if fast:
            assert batch.decoder.ngram == (3, 20)
            assert not batch._special(_Row(0, in_graph, frozenset())) and batch._special(_Row(1, outside, frozenset()))
            # a sampled token is not the graph's argmax, so the graph's history would be wrong for it
            assert batch._in_graph_ngram(in_graph) and not batch._in_graph_ngram(outside)
        outs[fast] = _run_continuous(batch, embeds, [SamplingParams(**vars(p)) for p in params])  # fresh seeds
    assert outs[True] == outs[False]
    unblocked = _run_continuous(DecodeBatch(model, capacity=2, max_len=512, eos_id=tok.eos_id, fast=False),
                                embeds, [SamplingParams(max_new_tokens=40, ngram_size=0)] * 3)
    assert unblocked[0] != outs[False][0]  # this model repeats itself: the blocker changed the output
    for i, p in enumerate(params):
        if p.temperature:
            continue
        seq = [t for t in outs[True][i] if t != tok.eos_id]
        for j in range(len(seq)):  # no token the reference rule bans at its step (whitelist aside)
            assert seq[j] not in banned_ngram_tokens(seq[:j], p.ngram_size, p.ngram_window) - p.whitelist_ids


@pytest.mark.parametrize("fast", [False, True])
def test_dropped_request_stops_and_frees_its_row(engine, fast):
    """A cancelled request is dropped between steps: it stops decoding (also on the device), the
    other row goes on as if alone, and a new request takes the freed row."""
    model, tok = engine.model, engine.tokenizer
    reqs = _requests(3, max_new=12)
    embeds = [engine.prompt_embeds(r.prompt, engine.encode_images(r.images))[0] for r in reqs]
    batch = DecodeBatch(model, capacity=2, max_len=256, eos_id=tok.eos_id, fast=fast)
    out = {0: [], 1: [], 2: []}
    for ev in batch.add([(i, embeds[i], reqs[i].params) for i in (0, 1)]):
        out[ev.request_id].append(ev.token_id)
    for ev in batch.step():
        out[ev.request_id].append(ev.token_id)
    assert batch.drop({1, "unknown"}) == 1 and batch.active == 1 and len(batch.free_rows()) == 1
    if fast:
        assert batch.decoder.active.tolist() == [True, False]
    for ev in batch.add([(2, embeds[2], reqs[2].params)]):
        out[2].append(ev.token_id)
    while batch.active:
        for ev in batch.step():
            assert ev.request_id != 1
            out[ev.request_id].append(ev.token_id)
    assert len(out[1]) == 2
    for i in (0, 2):
        assert [t for t in out[i] if t != tok.eos_id] == engine.generate([reqs[i]])[0].token_ids, i


def test_ngram_blocker_matches_reference_rule():
    seq = [1, 2, 3, 1, 2]
    assert banned_ngram_tokens(seq, 3, 100) == {3}  # "1 2 -> 3" was seen
    assert banned_ngram_tokens(seq, 3, 2) == set()  # outside the window
    assert banned_ngram_tokens([1, 2], 3, 100) == set()
    assert banned_ngram_tokens([4, 4, 4], 2, 100) == {4}


def test_ngram_blocking_prevents_repeats_and_whitelist_exempts(engine):
    r = _requests(1, max_new=40)[0]
    r.params = SamplingParams(max_new_tokens=40, ngram_size=2, ngram_window=100)
    out = engine.generate([r])[0].token_ids
    pairs = list(zip(out, out[1:]))
    assert len(pairs) == len(set(pairs)), "a bigram repeated despite ngram_size=2"


def test_sampling_controls():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    assert sample(logits, SamplingParams()) == 1
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert picks <= {1, 2} and len(picks) == 2
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(100)}
    assert picks == {1}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0).validate()


def test_seeded_sampling_is_reproducible(engine):
    r = _requests(1, max_new=10)[0]
    r.params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=123, ngram_size=0)
    assert engine.generate([r])[0].token_ids == engine.generate([r])[0].token_ids
