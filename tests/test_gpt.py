"""GPT: parameter count, KV-cache decode == full forward, packed segments == separate rows."""

import pytest
import torch

from model.config import GPTConfig, preset
from model.gpt import GPT, KVCache


def _tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=kw.pop("n_kv_head", 4),
                    n_embd=64, **kw)
    model = GPT(cfg)
    model.init_weights()
    # nanochat zero-inits the output projections; randomise so the test sees real attention
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_d20_parameter_count_on_meta():
    with torch.device("meta"):
        model = GPT(preset("full").gpt)
    assert model.num_params() == 560_988_160


def test_kv_cache_decode_reproduces_full_logits():
    for n_kv_head in (4, 2):  # MHA and GQA
        model = _tiny_gpt(n_kv_head=n_kv_head)
        idx = torch.randint(0, 97, (2, 12))
        full = model(idx)
        cache = KVCache(model.config, batch_size=2, max_len=32)
        prefill = model(idx[:, :5], kv_cache=cache)
        steps = [prefill]
        for t in range(5, 12):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache))
        stitched = torch.cat(steps, dim=1)
        assert torch.allclose(stitched, full, atol=1e-5), (stitched - full).abs().max()
        assert cache.lengths.tolist() == [12, 12]


def test_rows_of_different_lengths_in_one_cache():
    model = _tiny_gpt()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 4))
    ref_a, ref_b = model(a)[0, -1], model(b)[0, -1]
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0], padded[1, :4] = a[0], b[0]
    cache = KVCache(model.config, batch_size=2, max_len=16)
    logits = model(padded, kv_cache=cache, logits_rows=torch.tensor([8, 3]))
    assert torch.allclose(logits[0, 0], ref_a, atol=1e-5)
    assert torch.allclose(logits[1, 0], ref_b, atol=1e-5)
    # next step: each row continues at its own position, padding garbage stays masked
    cache.lengths = torch.tensor([9, 4])
    nxt = torch.tensor([[5], [7]])
    step = model(nxt, kv_cache=cache)
    assert torch.allclose(step[0, 0], model(torch.cat([a, nxt[:1]], 1))[0, -1], atol=1e-5)
    assert torch.allclose(step[1, 0], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5)


def test_packed_segments_match_separate_sequences():
    model = _tiny_gpt()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    out = model(packed, positions=pos, segment_ids=seg)
    assert torch.allclose(out[:, :7], model(a), atol=1e-5)
    assert torch.allclose(out[:, 7:], model(b), atol=1e-5)


def test_compiled_blocks_match_eager_loss_and_gradients_across_layouts():
    """GPT.compile_blocks (the trainer's compile_gpt): packed batches of two different segment
    layouts give the eager loss and gradients, and a KV-cache decode after them (generation
    during training) still matches the full forward, through the blocks' eager path."""
    eager, compiled = _tiny_gpt().train(), _tiny_gpt().train()
    compiled.compile_blocks(backend="aot_eager")
    compiled.compile_blocks(backend="aot_eager")  # a second call does not wrap the wrapper
    assert all(getattr(b.forward, "_nano_compiled", False) for b in compiled.transformer.h)
    for lengths in ([7, 5, 4], [3, 13]):
        idx = torch.randint(0, 97, (1, 16))
        seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        losses = []
        for m in (eager, compiled):
            m.zero_grad()
            loss = m(idx, idx, positions=pos, segment_ids=seg)
            loss.backward()
            losses.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        assert torch.allclose(losses[0][0], losses[1][0], atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(losses[0][1], losses[1][1]))
    compiled.eval()
    with torch.no_grad():
        prompt = torch.randint(0, 97, (1, 6))
        cache = KVCache(compiled.config, batch_size=1, max_len=16)
        compiled(prompt, kv_cache=cache)
        step = compiled(torch.tensor([[5]]), kv_cache=cache)
        assert torch.allclose(step[0, 0], eager.eval()(torch.cat([prompt, torch.tensor([[5]])], 1))[0, -1], atol=1e-5)


def test_inputs_embeds_path_equals_token_path_and_loss_ignores_minus_one():
    model = _tiny_gpt()
    idx = torch.randint(0, 97, (2, 6))
    assert torch.allclose(model(idx), model(inputs_embeds=model.embed(idx)))
    targets = idx.clone()
    targets[:, :3] = -1
    loss = model(idx, targets)
    logits = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[:, 3:].reshape(-1, 97), idx[:, 3:].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)


def test_logits_are_softcapped():
    model = _tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)
    assert model(torch.randint(0, 97, (1, 4))).abs().max() <= 15.0


@pytest.mark.parametrize("use_triton", [False, True])
def test_decoder_step_matches_eager_decode_in_both_matmul_layouts(use_triton):
    """GraphedDecoder's ops (the torch references, or the Triton kernels where Triton runs: a GPU,
    or its interpreter) reproduce GPT.forward's decode step, through the cuBLAS-style layout and
    the fused skinny-GEMV layout, for rows of different lengths and an idle row (which must not
    advance)."""
    import copy
    import os

    import model.gpt as gpt_module
    from model.gpt import GraphedDecoder

    if use_triton and (gpt_module.triton is None or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("the Triton kernels on CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")

    model = _tiny_gpt(n_kv_head=2)
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 4))
    padded = torch.zeros(3, 9, dtype=torch.long)
    padded[0], padded[1, :4] = a[0], b[0]
    nxt = torch.tensor([5, 7, 0])
    for skinny in (False, True):
        cache = KVCache(model.config, batch_size=3, max_len=16)
        with torch.no_grad():
            model(padded, kv_cache=cache, logits_rows=torch.tensor([8, 3, 0]))
        cache.lengths.copy_(torch.tensor([9, 4, 0]))
        eager_cache = copy.deepcopy(cache)
        with torch.no_grad():
            want = model(nxt[:2, None], kv_cache=eager_cache, cache_rows=torch.tensor([0, 1]))[:, 0]
        dec = GraphedDecoder(model, cache, use_graph=False, use_triton=use_triton, skinny=skinny)
        assert dec.skinny is skinny
        dec.tokens.copy_(nxt)
        dec.active.copy_(torch.tensor([True, True, False]))
        dec.step()
        assert torch.allclose(dec.logits[:2], want, atol=1e-5), (dec.logits[:2] - want).abs().max()
        assert dec.greedy[:2].tolist() == want.argmax(-1).tolist()
        assert cache.lengths.tolist() == [10, 5, 0]
        # the keys/values written at the new positions are the eager path's
        for rows, length in (([0], 10), ([1], 5)):
            assert torch.allclose(cache.k[:, rows, :, :length], eager_cache.k[:, rows, :, :length], atol=1e-5)
            assert torch.allclose(cache.v[:, rows, :, :length], eager_cache.v[:, rows, :, :length], atol=1e-5)


def _capture_order(use_triton: bool, fail: set, ngram=(3, 8)):
    """A GraphedDecoder whose CUDA-graph capture is replaced by a record of what was captured with
    which kernels (CUDA graphs need a GPU): ``fail`` holds the (use_triton, pdl, ngram) captures that
    raise. Returns the decoder and the captures tried."""
    from model.gpt import GraphedDecoder

    tried = []

    class Graph:
        def __init__(self) -> None:
            self.replays = 0

        def replay(self) -> None:
            self.replays += 1

    class RecordingDecoder(GraphedDecoder):
        def _capture(self, ngram: bool) -> None:
            key = (self.kernels.use_triton, self.kernels.pdl, ngram)
            tried.append(key)
            if key in fail:
                raise RuntimeError(f"capture {key} failed")
            self.graphs[ngram] = Graph()

    model = _tiny_gpt()
    dec = RecordingDecoder(model, KVCache(model.config, batch_size=2, max_len=16), use_graph=True,
                           use_triton=use_triton, ngram=ngram)
    return dec, tried


def test_graphed_decoder_capture_leaves_out_only_a_failing_ngram_blocker():
    with pytest.warns(UserWarning, match="n-gram blocker failed"):
        dec, tried = _capture_order(False, fail={(False, False, True)})
    assert tried == [(False, False, False), (False, False, True)]
    assert dec.ngram is None and list(dec.graphs) == [False]
    dec.ngram_on = True  # the engine asks for the blocker: the graph without it runs
    dec.step()
    assert dec.graphs[False].replays == 1

    dec, tried = _capture_order(False, fail=set())
    assert tried == [(False, False, False), (False, False, True)] and dec.ngram == (3, 8)
    dec, tried = _capture_order(False, fail=set(), ngram=None)
    assert tried == [(False, False, False)] and list(dec.graphs) == [False]
    with pytest.raises(RuntimeError, match="capture"):  # nothing left to fall back to
        _capture_order(False, fail={(False, False, False)})


def test_graphed_decoder_capture_keeps_the_triton_kernels_when_only_the_blocker_fails():
    import model.gpt as gpt_module

    if gpt_module.triton is None:
        pytest.skip("Triton is not installed")
    with pytest.warns(UserWarning, match="n-gram blocker failed"):
        dec, tried = _capture_order(True, fail={(True, False, True)})
    assert tried == [(True, False, False), (True, False, True)]
    assert dec.kernels.use_triton and dec.ngram is None and list(dec.graphs) == [False]
    # failing kernels fall back to the torch ops, which then capture the blocker too
    with pytest.warns(UserWarning, match="Triton decode kernels failed"):
        dec, tried = _capture_order(True, fail={(True, False, False)})
    assert tried == [(True, False, False), (False, False, False), (False, False, True)]
    assert not dec.kernels.use_triton and dec.ngram == (3, 8) and sorted(dec.graphs) == [False, True]


def test_skinny_linear_reference_epilogues_and_errors():
    from model.gpt import rms_norm, skinny_linear_ref

    torch.manual_seed(0)
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    assert torch.allclose(skinny_linear_ref(x, w, norm_input=True), rms_norm(x) @ w.T)
    assert torch.allclose(skinny_linear_ref(x, w, epilogue="relu2"), torch.relu(x @ w.T) ** 2)
    res = torch.randn(2, 5)
    out = res.clone()
    assert skinny_linear_ref(x, w, epilogue="residual", out=out) is out
    assert torch.allclose(out, res + x @ w.T)
    logits = torch.empty(2, 5)
    skinny_linear_ref(x, w, epilogue="softcap", out=logits, cap=3.0)
    assert torch.allclose(logits, 3.0 * torch.tanh(x @ w.T / 3.0)) and logits.abs().max() < 3.0
    with pytest.raises(ValueError, match="unknown epilogue"):
        skinny_linear_ref(x, w, epilogue="gelu")
