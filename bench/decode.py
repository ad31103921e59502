"""GPT decode throughput next to its memory roofline.

For each batch size, ``B`` requests with a ~900-token vision prefix are prefilled into a
:class:`model.engine.DecodeBatch` (time to first token) and then decoded for ``--new`` steps.
One step must read every weight matrix once plus every active row's KV cache; that byte count
over the measured copy bandwidth is the roofline. ``--check`` first compares the fast decode path
with the eager ``GPT.forward`` path (logits of one step, greedy tokens over many).

    python bench/decode.py                      # full preset on CUDA, batch 1/8/32/128
    python bench/decode.py --preset tiny --quick --device cpu --check   # smoke test
"""

from __future__ import annotations

import time

import torch

from common import (Table, base_parser, build_model, copy_bandwidth, free_memory, is_oom, report,
                    sync)

from model.engine import DEFAULT_NGRAM, DecodeBatch, SamplingParams


def prompts(n: int, length: int, width: int, device, dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(length + (i % 7), width, generator=g).to(device, dtype) for i in range(n)]


def kv_bytes_per_position(model) -> int:
    g = model.config.gpt
    return g.n_layer * 2 * g.n_kv_head * g.head_dim * torch.finfo(model.gpt.lm_head.weight.dtype).bits // 8


def decode_all(b: DecodeBatch, ps: list[torch.Tensor], params: SamplingParams) -> dict[int, list[int]]:
    """Every prompt's tokens, decoded in ``b`` to the end."""
    toks = {i: [ev.token_id] for i, ev in enumerate(b.add([(i, p, params) for i, p in enumerate(ps)]))}
    while b.active:
        for ev in b.step():
            toks[ev.request_id].append(ev.token_id)
    return toks


def check(model, device, dtype, eos: int) -> list[str]:
    """Fast path vs eager path on the same prompts: one step's logits, then greedy agreement."""
    width = model.config.gpt.n_embd
    ps = prompts(4, 40, width, device, dtype, seed=1)
    params = SamplingParams(max_new_tokens=64, ngram_size=0, stop_ids=frozenset({-1}))
    out = {}
    for fast in (False, True):
        out[fast] = decode_all(DecodeBatch(model, 4, 200, eos, device, dtype, fast=fast), ps, params)
    fb = DecodeBatch(model, 4, 200, eos, device, dtype, fast=True)
    first_tokens = torch.tensor([ev.token_id for ev in fb.add([(i, p, params) for i, p in enumerate(ps)])],
                                device=device)
    fb.decoder.step()  # exactly one decode step (DecodeBatch.step may run one ahead)
    fast_logits = fb.decoder.logits.clone()
    # logits of the first decode step: the eager path, and an fp32 copy of the model as reference
    def first_step_logits(m, dt):
        ref = DecodeBatch(m, 4, 200, eos, device, dt, fast=False)
        ref.add([(i, p.to(dt), params) for i, p in enumerate(ps)])
        ref.next_token.copy_(first_tokens)  # the same inputs for every variant
        with torch.inference_mode():
            return m.gpt(ref.next_token[:, None], positions=ref.cache.lengths.clone()[:, None],
                         kv_cache=ref.cache)[:, 0].float()

    logits = first_step_logits(model, dtype)
    rel = ((fast_logits - logits).norm() / logits.norm()).item()
    if dtype != torch.float32:
        import copy

        exact = first_step_logits(copy.deepcopy(model).float(), torch.float32)
        err = lambda x: ((x - exact).norm() / exact.norm()).item()  # noqa: E731
        fp32_note = f"; vs an fp32 reference: fast {err(fast_logits):.2e}, eager {err(logits):.2e}"
    else:
        fp32_note = ""
    notes_ops = check_triton_ops(model, device, dtype) + check_ngram(model, device, dtype, eos)
    agree = [sum(a == b for a, b in zip(out[False][i], out[True][i])) for i in range(4)]
    first_diff = []
    for i in range(4):
        d = next((k for k, (a, b) in enumerate(zip(out[False][i], out[True][i])) if a != b), None)
        first_diff.append("none" if d is None else str(d))
    n = len(out[False][0])
    notes = [f"check (fast vs eager path, 4 rows): first-step logits relative difference {rel:.2e}{fp32_note}; "
             f"greedy tokens equal {agree} of {n}; first difference at step {first_diff}"]
    print(notes[0], flush=True)
    if dtype == torch.float32 and rel > 1e-4:
        raise AssertionError(f"fast decode path disagrees with eager in fp32: {rel}")
    return notes + notes_ops


def ngram_setup(mode: str, ngram: tuple[int, int] = DEFAULT_NGRAM) -> tuple[SamplingParams, tuple[int, int] | None]:
    """Sampling params and DecodeBatch's ``graph_ngram`` for an n-gram blocker mode: ``off``, or the
    blocker (by default the reference's: 30-grams in a 90-token window) applied in the decode
    ``graph`` or by the ``host`` between steps (on the device, as the engine did for every request before)."""
    if mode == "off":
        return SamplingParams(ngram_size=0, stop_ids=frozenset({-1})), None
    if mode not in ("graph", "host"):
        raise SystemExit(f"unknown n-gram mode {mode!r}: off, graph or host")
    params = SamplingParams(ngram_size=ngram[0], ngram_window=ngram[1], stop_ids=frozenset({-1}))
    return params, ngram if mode == "graph" else None


def check_ngram(model, device, dtype, eos: int, new: int = 160) -> list[str]:
    """The blocker inside the decode graph against the same blocker between steps: the same tokens.
    The reference's 30-grams rarely fire on a random model, so 3-grams (which do) are checked too,
    on the cuBLAS path (4 rows) and the skinny one (1 row)."""
    notes = []
    for rows, ngram in ((4, DEFAULT_NGRAM), (4, (3, 24)), (1, (3, 24))):
        ps = prompts(rows, 40, model.config.gpt.n_embd, device, dtype, seed=3)
        out = {}
        for mode in ("graph", "host", "off"):
            params, graph_ngram = ngram_setup(mode, ngram)
            params.max_new_tokens = new
            batch = DecodeBatch(model, rows, 256, eos, device, dtype, fast=True, graph_ngram=graph_ngram)
            out[mode] = decode_all(batch, ps, params)
        changed = sum(out["graph"][i] != out["off"][i] for i in range(rows))
        note = (f"n-gram blocker ({ngram[0]}-grams, window {ngram[1]}) in the decode graph vs between steps, "
                f"{rows} rows x {new} tokens: {'identical' if out['graph'] == out['host'] else 'DIFFERENT'}; "
                f"the blocker changed {changed} of {rows} rows")
        print(note, flush=True)
        if out["graph"] != out["host"]:
            raise AssertionError(note)
        notes.append(note)
    return notes


@torch.inference_mode()
def check_triton_ops(model, device, dtype) -> list[str]:
    """The Triton decode ops against their torch references at the model's shapes: the skinny
    GEMV for every product and epilogue (1 and 3 rows), RoPE + cache write + attention fused and
    as separate launches (3 rows of different lengths, twice on one scratch)."""
    from model.gpt import DecodeKernels

    if device.type != "cuda":
        return []
    fused, ref = DecodeKernels(True), DecodeKernels(False)
    worst = {}
    for name, n, k, norm, epilogue in gemv_shapes(model.config.gpt):
        w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        for batch in (1, 3):
            x = torch.randn(batch, k, device=device, dtype=dtype)
            base = torch.randn(batch, n, device=device, dtype=torch.float32 if epilogue == "softcap" else dtype)
            a, b = base.clone(), base.clone()
            ya = fused.skinny_linear(x, w, norm, epilogue, a, 15.0)
            yb = ref.skinny_linear(x, w, norm, epilogue, b, 15.0)
            rel = ((ya.float() - yb.float()).norm() / yb.float().norm()).item()
            worst[name] = max(worst.get(name, 0.0), rel)
    cfg = model.config.gpt
    for fuse in (True, False):  # RoPE + cache write + split-K attention (+ merge), fused and as separate launches
        g = torch.Generator(device="cpu").manual_seed(3)
        B, L = 3, 1100
        qkv = torch.randn(B, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, generator=g).to(device, dtype)
        kc = torch.randn(B, cfg.n_kv_head, L, cfg.head_dim, generator=g).to(device, dtype)
        vc = torch.randn(B, cfg.n_kv_head, L, cfg.head_dim, generator=g).to(device, dtype)
        n_keys = torch.tensor([1, 517, 1000], device=device)
        outs = []
        for kern in (fused, ref):
            k2, v2 = kc.clone(), vc.clone()
            scratch = kern.attention_scratch(B, cfg.n_head, cfg.head_dim, L, device)
            ys = [kern.rope_attention(qkv, model.gpt.cos.float(), model.gpt.sin.float(), n_keys - 1, n_keys, k2, v2,
                                      cfg.n_head, scratch, fuse).float()
                  for _ in range(2)]  # twice on one scratch: the merge counters must be back at zero
            outs.append((ys, k2.float(), v2.float()))
        (ya, ka, va), (yb, kb, vb) = outs
        tag = "" if fuse else " (separate launches)"
        worst[f"rope+attention{tag}"] = max(((a - yb[0]).norm() / yb[0].norm()).item() for a in ya)
        worst[f"cache write{tag}"] = max(((ka - kb).norm() / kb.norm()).item(), ((va - vb).norm() / vb.norm()).item())
    note = "Triton decode ops vs torch reference (relative difference, batch 1 and 3): " + ", ".join(
        f"{k} {v:.1e}" for k, v in worst.items())
    print(note, flush=True)
    if max(worst.values()) > 2e-2:
        raise AssertionError(note)
    return [note]


def run_batch(model, device, dtype, batch: int, prefix: int, new: int, eos: int, fast: bool, bw: float,
              ngram: str = "off"):
    width = model.config.gpt.n_embd
    ps = prompts(batch, prefix, width, device, dtype, seed=batch)
    params, graph_ngram = ngram_setup(ngram)
    params.max_new_tokens = new + 2
    b = DecodeBatch(model, batch, prefix + new + 32, eos, device, dtype, fast=fast, graph_ngram=graph_ngram)
    sync(device)
    t0 = time.perf_counter()
    b.add([(i, p, params) for i, p in enumerate(ps)])  # prefill + first token (its host copy syncs)
    ttft = time.perf_counter() - t0
    for _ in range(3):  # warm-up steps
        b.step()
    parts = profile_parts(b, model) if fast else {}
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new - 3):
        b.step()
    sync(device)
    seconds = time.perf_counter() - t0
    steps = new - 3
    step_s = seconds / steps
    ctx = sum(p.shape[0] for p in ps) / batch + 4 + steps / 2  # mean context over the timed steps
    kv_pos = kv_bytes_per_position(model)
    weights = b.decoder.weight_bytes() if b.decoder is not None else _weight_bytes(model)
    kv_read = batch * ctx * kv_pos
    roof_s = (weights + kv_read) / bw
    return dict(batch=batch, fast=fast, ttft_ms=ttft * 1e3, step_ms=step_s * 1e3, tok_s=batch / step_s,
                roof_tok_s=batch / roof_s, eff=roof_s / step_s, weights_only_eff=(weights / bw) / step_s,
                kv_alloc_gb=b.cache.nbytes() / 1e9, kv_used_gb=batch * (ctx + steps / 2 + 4) * kv_pos / 1e9,
                bytes_per_step_gb=(weights + kv_read) / 1e9, context=ctx, **parts)


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of ``fn`` captured in a CUDA graph (launch gaps removed), by CUDA events."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


@torch.inference_mode()
def profile_parts(b: DecodeBatch, model) -> dict:
    """Where one step's time goes: all layers' attention alone, and all matrix products alone."""
    dec = b.decoder
    if dec is None or b.device.type != "cuda":
        return {}
    import torch.nn.functional as F

    cfg = model.config.gpt
    B, dtype = b.capacity, b.dtype
    n_keys = dec.lengths + 1
    kv_pos = kv_bytes_per_position(model)
    attn_bytes = int(n_keys.sum()) * kv_pos

    qkv = torch.randn(B, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, device=b.device, dtype=dtype)

    def attention():  # as the step runs it: RoPE + cache write + split-K attention + merge
        for i in range(cfg.n_layer):
            dec.kernels.rope_attention(qkv, dec.cos, dec.sin, dec.lengths, n_keys, b.cache.k[i], b.cache.v[i],
                                       cfg.n_head, dec.scratch, fuse=dec.skinny)

    h = torch.randn(B, cfg.n_embd, device=b.device, dtype=dtype)
    m = torch.randn(B, 4 * cfg.n_embd, device=b.device, dtype=dtype)

    logits = torch.empty(B, cfg.vocab_size, device=b.device, dtype=torch.float32)
    residual = h.clone()

    def gemms():
        if dec.skinny:  # the fused kernels, with their norm prologues and epilogues
            lin = dec.kernels.skinny_linear
            for w_qkv, w_o, w_fc, w_proj in dec.layers:
                lin(h, w_qkv, True), lin(h, w_o, False, "residual", residual), lin(h, w_fc, True, "relu2")
                lin(m, w_proj, False, "residual", residual)
            lin(h, dec.lm_head, True, "softcap", logits, 15.0)
            return
        for w_qkv, w_o, w_fc, w_proj in dec.layers:
            F.linear(h, w_qkv), F.linear(h, w_o), F.linear(h, w_fc), F.linear(m, w_proj)
        F.linear(h, dec.lm_head)

    t_attn, t_gemm = graph_time(attention), graph_time(gemms)
    saved = dec.lengths.clone()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dec.step()
    end.record()
    torch.cuda.synchronize()
    t_step = start.elapsed_time(end) / 1e3 / 10
    dec.lengths.copy_(saved)  # the replays advanced the active rows: put them back
    return dict(attn_ms=t_attn * 1e3, attn_tbs=attn_bytes / t_attn / 1e12, gemm_ms=t_gemm * 1e3,
                gemm_tbs=dec.weight_bytes() / t_gemm / 1e12, graph_step_ms=t_step * 1e3)


def filled_batch(model, device, dtype, batch: int, prefix: int, new: int, eos: int) -> DecodeBatch:
    """The cache run_batch builds, every row holding a prompt that never stops (graph replays to time)."""
    params, _ = ngram_setup("off")
    params.max_new_tokens = 10 ** 6
    b = DecodeBatch(model, batch, prefix + new + 32, eos, device, dtype, fast=True)
    ps = prompts(batch, prefix, model.config.gpt.n_embd, device, dtype, seed=batch)
    b.add([(i, p, params) for i, p in enumerate(ps)])
    return b


@torch.inference_mode()
def timeline(model, device, dtype, batch: int, prefix: int, new: int, eos: int,
             steps: int = 5) -> tuple[list[list[object]], dict]:
    """Where one graph replay's time goes, kernel by kernel (torch profiler on the replays).

    Under programmatic dependent launch a kernel starts before the one ahead of it ends, so its
    own duration overstates it; what a kernel adds to the step is the time from the previous
    kernel's end to its own end ("exposed"), and those add up to the step.
    """
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        raise SystemExit("--timeline profiles CUDA graph replays: it needs a CUDA device")
    dec = filled_batch(model, device, dtype, batch, prefix, new, eos).decoder
    for _ in range(3):
        dec.step()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.step()
        sync(device)
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.end > 0),
                     key=lambda e: e.time_range.start)
    if not kernels or len(kernels) % steps:
        raise RuntimeError(f"profiler saw {len(kernels)} kernels for {steps} replays (CUPTI cannot trace graphs here?)")
    per_step = len(kernels) // steps
    by_name: dict[str, list[float]] = {}
    for i in range(per_step, len(kernels)):  # the first replay has no previous end to count from
        e = kernels[i]
        exposed = e.time_range.end - max(kernels[i - 1].time_range.end, 0)
        name = e.name if len(e.name) < 48 else e.name[:45] + "..."
        by_name.setdefault(name, []).append(exposed)
    measured = steps - 1
    step_us = (kernels[-1].time_range.end - kernels[per_step - 1].time_range.end) / measured
    rows = sorted(([name, len(v) // measured, f"{sum(v) / measured:.1f}", f"{sum(v) / len(v):.2f}",
                    f"{100 * sum(v) / measured / step_us:.0f}%"] for name, v in by_name.items()),
                  key=lambda r: -float(r[2]))
    return rows, {"kernels_per_step": per_step, "step_us": step_us}


SWEEP = [(64, 4, 512), (64, 8, 512), (32, 4, 512), (128, 8, 512), (64, 4, 256), (64, 8, 1024), (128, 4, 512)]
ONE_ROW_SWEEP = [(64, 2, 512), (32, 2, 512), (32, 1, 512), (16, 1, 512)]  # fewer warps: cheaper reductions


@torch.inference_mode()
def sweep(model, device, dtype, eos: int, prefix: int, bw: float, out_path: str) -> list[list[object]]:
    """Time the split-K attention kernels (all layers, in a CUDA graph) for launch settings at
    batch 128 and 1; the best at batch 128 is written as NANO_OCR_DECODE_ATTN's value."""
    import model.gpt as gpt_module

    launches = (gpt_module.DECODE_ATTENTION, gpt_module.DECODE_ATTENTION_ONE_ROW)  # both batch sizes get each
    saved = [dict(launch) for launch in launches]
    cfg = model.config.gpt
    kv_pos = kv_bytes_per_position(model)
    batches = {}
    for batch in (128, 1):
        b = DecodeBatch(model, batch, prefix + 64, eos, device, dtype, fast=True)
        b.add([(i, p, SamplingParams(max_new_tokens=8, ngram_size=0, stop_ids=frozenset({-1})))
               for i, p in enumerate(prompts(batch, prefix, cfg.n_embd, device, dtype, seed=7))])
        batches[batch] = b
    rows, best = [], None
    try:
        for block_n, warps, max_split in SWEEP:
            for launch in launches:
                launch.update(block_n=block_n, num_warps=warps, max_split=max_split)
            row = [f"{block_n}, {warps}, {max_split}"]
            for batch, b in batches.items():
                dec = b.decoder
                q = torch.randn(batch, cfg.n_head, cfg.head_dim, device=device, dtype=dtype)
                n_keys = dec.lengths + 1
                scratch = dec.kernels.attention_scratch(batch, cfg.n_head, cfg.head_dim, b.cache.max_len, device)

                def attention():
                    for i in range(cfg.n_layer):
                        dec.kernels.decode_attention(q, b.cache.k[i], b.cache.v[i], n_keys, scratch)

                t = graph_time(attention)
                row += [f"{t * 1e3:.3f}", f"{int(n_keys.sum()) * kv_pos / t / 1e12:.2f}"]
                if batch == 128 and (best is None or t < best[0]):
                    best = (t, f"{block_n},{warps},{max_split}")
            print(row, flush=True)
            rows.append(row)
    finally:
        for launch, before in zip(launches, saved):
            launch.clear()
            launch.update(before)
    if out_path and best:
        with open(out_path, "w") as f:
            f.write(best[1])
    print(f"best at batch 128: {best[1]} ({best[0] * 1e3:.3f} ms)", flush=True)
    return rows


def path_name(fast: bool, device, skinny: bool, ngram: str = "off") -> str:
    blocker = {"off": "", "graph": ", n-gram blocker in the graph", "host": ", n-gram blocker between steps"}[ngram]
    if not fast:
        return "eager GPT.forward" + blocker
    if device.type != "cuda":
        return "fast path, torch ops" + (" (skinny layout)" if skinny else "") + blocker
    return ("CUDA graph + Triton, skinny GEMV" if skinny else "CUDA graph + Triton, cuBLAS") + blocker


def gemv_shapes(cfg) -> list[tuple[str, int, int, bool, str]]:
    """(name, N, K, norm_input, epilogue) of every matrix product in one decode step."""
    d = cfg.n_embd
    qkv = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    return [("qkv", qkv, d, True, "none"), ("attn out", d, d, False, "residual"),
            ("mlp fc", 4 * d, d, True, "relu2"), ("mlp proj", d, 4 * d, False, "residual"),
            ("lm_head", cfg.vocab_size, d, True, "softcap")]


GEMV_LAUNCHES = [(bn, warps) for bn in (1, 2, 4, 8, 16) for warps in (2, 4, 8)]


@torch.inference_mode()
def tune_in_step(model, device, dtype, prefix: int, new: int, eos: int, rounds: int = 1,
                 attention: bool = True) -> list[list[object]]:
    """The skinny GEMV launches chosen inside a whole batch-1 decode step rather than alone.

    Alone, each product has the GPU to itself; in a step it runs between other kernels that hold
    SMs and registers while it starts streaming its weights, so a launch that wins alone can lose
    there. Coordinate descent: for each product in turn, every launch of GEMV_LAUNCHES that fits,
    the others held at their current best; the measure is the step time of graph replays. Then
    (``attention``) the one-row split-K attention launches of SWEEP + ONE_ROW_SWEEP, reported, not kept.
    """
    import model.gpt as gpt_module

    if device.type != "cuda":
        raise SystemExit("--tune-in-step times CUDA graph replays: it needs a CUDA device")

    def step_ms() -> float:
        dec, best = filled_batch(model, device, dtype, 1, prefix, new, eos).decoder, float("inf")
        for _ in range(3):
            dec.step()
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(new // 3):
                dec.step()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / (new // 3))
        return best

    tuned = gpt_module.SKINNY_TUNED
    saved = dict(tuned)
    rows = []
    try:
        baseline = current = step_ms()
        for rnd in range(rounds):
            for name, n, k, _, _ in gemv_shapes(model.config.gpt):
                kp = gpt_module._next_pow2(k)
                before = tuned.get((n, k))
                times = {}
                for launch in GEMV_LAUNCHES:
                    if launch[0] * kp > 32768 or -(-n // launch[0]) < 66:  # spills; under half the SMs
                        continue
                    tuned[(n, k)] = launch
                    times[launch] = step_ms()
                best = min(times, key=times.get)
                tuned[(n, k)] = best
                current = times[best]
                rows.append([rnd + 1, name, f"{n} x {k}", str(before), f"{times.get(before, float('nan')):.4f}",
                             str(best), f"{current:.4f}"])
                print(rows[-1], flush=True)
        if attention:  # the split-K attention launch for one row
            att = gpt_module.DECODE_ATTENTION_ONE_ROW
            saved_att = dict(att)
            times = {}
            try:
                for block_n, warps, max_split in SWEEP + ONE_ROW_SWEEP:
                    att.update(block_n=block_n, num_warps=warps, max_split=max_split)
                    times[(block_n, warps, max_split)] = step_ms()
            finally:
                att.clear()
                att.update(saved_att)
            before = (saved_att["block_n"], saved_att["num_warps"], saved_att["max_split"])
            best = min(times, key=times.get)
            rows.append(["", "attention", "(block_n, warps, max_split)", str(before),
                         f"{times.get(before, float('nan')):.4f}", str(best), f"{times[best]:.4f}"])
        rows.append(["", "step", "", "SKINNY_TUNED before", f"{baseline:.4f}", "after", f"{current:.4f}"])
        rows.append(["", "tuned", "", "", "", repr({k: v for k, v in tuned.items()}), ""])
    finally:
        tuned.clear()
        tuned.update(saved)
    return rows


@torch.inference_mode()
def gemv_sweep(model, device, dtype, batches: list[int]) -> list[list[object]]:
    """Each decode matrix product alone: cuBLAS F.linear vs the fused skinny GEMV (default launch
    and the best of a sweep). Every call reads another copy of the weights (> 200 MB in all) so
    that L2 (50 MB) cannot serve them, and the calls run back to back in a CUDA graph, as in a
    decode step."""
    import torch.nn.functional as F

    from model.gpt import DecodeKernels, _next_pow2, _sm_count, skinny_launch

    kernels = DecodeKernels(True)
    rows = []
    for name, n, k, norm, epilogue in gemv_shapes(model.config.gpt):
        nbytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(2, min(64, -(-(200 << 20) // nbytes)))
        ws = [torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5 for _ in range(copies)]
        for batch in batches:
            x = torch.randn(batch, k, device=device, dtype=dtype)
            out = torch.zeros(batch, n, device=device, dtype=torch.float32 if epilogue == "softcap" else dtype)

            def cublas():
                for w in ws:
                    F.linear(x, w)

            def fused(launch):
                def fn():
                    for w in ws:
                        kernels.skinny_linear(x, w, norm, epilogue, out, 15.0, launch)
                return fn

            t_cublas = graph_time(cublas, reps=5) / copies
            default = skinny_launch(batch, n, k, _sm_count(device))
            t_default = graph_time(fused(default), reps=5) / copies
            best = (t_default, default)
            for launch in GEMV_LAUNCHES:
                if launch[0] * _next_pow2(k) > 32768 or launch[0] * _next_pow2(k) < 8 * 32 * launch[1]:
                    continue  # too many registers, or fewer elements than threads
                t = graph_time(fused(launch), reps=5) / copies
                best = min(best, (t, launch))
            tbs = lambda t: f"{t * 1e6:.1f} ({nbytes / t / 1e12:.2f})"  # noqa: E731
            row = [name, f"{n} x {k}", batch, f"{nbytes / 1e6:.1f}", tbs(t_cublas), tbs(t_default),
                   str(default), tbs(best[0]), str(best[1])]
            print(row, flush=True)
            rows.append(row)
        ws.clear()  # free this shape's copies before the next shape's
    return rows


def _part(r: dict, name: str) -> str:
    if f"{name}_ms" not in r:
        return ""
    return f"{r[name + '_ms']:.3f} ({r[name + '_tbs']:.2f})"


def _weight_bytes(model) -> int:
    g = model.gpt
    return sum(p.numel() * p.element_size() for n, p in g.named_parameters() if "wte" not in n)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="full")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--prefix", type=int, default=912, help="prompt length: 903 vision slots + a short prompt")
    p.add_argument("--new", type=int, default=128, help="decode steps timed per batch size")
    p.add_argument("--eager", default="1,32", help="batch sizes also timed on the eager (non-graph) path")
    p.add_argument("--cublas", default="1", help="skinny-path batch sizes also timed on the cuBLAS path")
    p.add_argument("--gemv-sweep", default="", metavar="BATCHES",
                   help="time each matrix product alone (cuBLAS vs skinny GEMV launches) at these batches, exit")
    p.add_argument("--check", action="store_true")
    p.add_argument("--ngram", default="off", help="also time these n-gram blocker modes at --batches: graph "
                   "(the reference's blocker inside the decode graph, the default for requests), host (between steps)")
    p.add_argument("--tune-in-step", action="store_true",
                   help="choose the skinny GEMV launches by whole batch-1 step time, exit")
    p.add_argument("--timeline", type=int, default=0, metavar="BATCH",
                   help="profile graph replays at this batch: each kernel's exposed time per step, exit")
    p.add_argument("--sweep", default="", help="time attention launch settings; write the best to this file, exit")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.preset, args.batches, args.prefix, args.new, args.eager = "tiny", "1,4,8", 60, 12, "1"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.preset, device, dtype, seed=args.seed).eval()
    eos = 1
    bw = copy_bandwidth(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    if args.sweep:
        rows = sweep(model, device, dtype, eos, 1300, bw, args.sweep)
        report(Table("Decode attention launch settings (bench/decode.py --sweep)",
                     ["block_n, warps, max keys/split", "batch 128 ms (20 layers)", "TB/s", "batch 1 ms", "TB/s"],
                     rows, ["context 1300 tokens per row (a page's mean context while decoding 800 tokens)",
                            "TB/s = KV bytes read / time; the defaults are the first row unless "
                            "NANO_OCR_DECODE_ATTN sets them"]), device, args, {"sweep": rows})
        return
    if args.tune_in_step:
        rows = tune_in_step(model, device, dtype, args.prefix, args.new, eos)
        report(Table("Skinny GEMV launches chosen in the whole step (bench/decode.py --tune-in-step)",
                     ["round", "product", "N x K", "launch before", "step ms", "best launch", "step ms"], rows,
                     ["batch 1, full step graph replays (best of three runs of a third of the steps); launch = "
                      "(BLOCK_N, num_warps); each product swept with the others at their best so far"]),
               device, args, {"tune": rows})
        return
    if args.timeline:
        rows, info = timeline(model, device, dtype, args.timeline, args.prefix, args.new, eos)
        report(Table(f"Decode step kernel by kernel (bench/decode.py --timeline {args.timeline})",
                     ["kernel", "per step", "exposed us/step", "us each", "of step"], rows,
                     [f"{info['kernels_per_step']} kernels per step, {info['step_us']:.1f} us from one replay's "
                      "last kernel end to the next's (profiled replays, back to back)",
                      "exposed = this kernel's end - the previous kernel's end: what it adds to the step "
                      "(under programmatic dependent launch kernels overlap)"]), device, args, {"timeline": rows, **info})
        return
    if args.gemv_sweep:
        rows = gemv_sweep(model, device, dtype, [int(b) for b in args.gemv_sweep.split(",")])
        report(Table("Decode matrix products alone (bench/decode.py --gemv-sweep)",
                     ["product", "N x K", "batch", "MB", "cuBLAS us (TB/s)", "skinny GEMV us (TB/s)", "launch",
                      "best swept us (TB/s)", "best launch"], rows,
                     ["each call reads its own copy of the weights (L2 cannot hold them); calls back to back "
                      "in one CUDA graph; TB/s = weight bytes / time",
                      "skinny GEMV = the fused kernel with its norm prologue / epilogue (it does more than "
                      "cuBLAS's bare product); launch = (BLOCK_N, num_warps)"]), device, args, {"gemv": rows})
        return
    notes = check(model, device, dtype, eos) if args.check else []
    rows, raw = [], []
    import model.gpt as gpt_module

    skinny_max = gpt_module.DECODE_GEMV["max_batch"]
    runs = [(b, True, b <= skinny_max, "off") for b in map(int, args.batches.split(","))]
    runs += [(b, True, False, "off") for b in map(int, args.cublas.split(",")) if b <= skinny_max] if args.cublas else []
    runs += [(b, False, False, "off") for b in map(int, args.eager.split(","))] if args.eager else []
    runs += [(b, True, b <= skinny_max, mode) for mode in args.ngram.split(",") if mode and mode != "off"
             for b in map(int, args.batches.split(","))]
    for batch, fast, skinny, ngram in runs:
        free_memory(device)
        gpt_module.DECODE_GEMV["max_batch"] = skinny_max if skinny else 0
        try:
            r = run_batch(model, device, dtype, batch, args.prefix, args.new, eos, fast, bw, ngram)
        except Exception as exc:
            if not is_oom(exc):
                raise
            rows.append([batch, path_name(fast, device, skinny, ngram), "OOM"] + [""] * 11)
            continue
        finally:
            gpt_module.DECODE_GEMV["max_batch"] = skinny_max
        raw.append(r)
        print(r, flush=True)
        rows.append([batch, path_name(fast, device, skinny, ngram), f"{r['ttft_ms']:.1f}", f"{r['step_ms']:.3f}",
                     f"{r['tok_s']:,.0f}", f"{r['roof_tok_s']:,.0f}", f"{100 * r['eff']:.0f}%",
                     f"{100 * r['weights_only_eff']:.0f}%", f"{r['bytes_per_step_gb']:.2f}",
                     f"{r['kv_used_gb']:.2f} / {r['kv_alloc_gb']:.2f}", f"{r['context']:.0f}",
                     _part(r, "attn"), _part(r, "gemm"),
                     f"{r['graph_step_ms']:.3f}" if "graph_step_ms" in r else ""])
    notes += [f"decode attention launch settings {gpt_module.DECODE_ATTENTION} (one row: "
              f"{gpt_module.DECODE_ATTENTION_ONE_ROW}); skinny GEMV up to batch "
              f"{skinny_max}"]
    notes += [f"model: {args.preset} preset GPT ({model.config.gpt.n_layer} layers, width {model.config.gpt.n_embd}), "
              f"{str(dtype).replace('torch.', '')} weights and KV cache, random weights; prefix {args.prefix}-{args.prefix + 6} "
              f"tokens of vision-like embeddings; {args.new} decode steps per batch (3 warm-up)",
              f"roofline: (matrix weights read once + each row's KV cache read once) / measured copy bandwidth "
              f"{bw / 1e12:.2f} TB/s; 'of roofline' = roofline step time / measured step time; "
              f"'weights-only' counts the weights alone (the batch-1 target's definition)",
              "TTFT = prefill of the whole batch + first token on the host",
              "parts (CUDA graphs of one kind of work, all layers): attention = RoPE + cache write + the split-K "
              "decode kernels over each row's KV; matmuls = every weight matrix at this batch; graph replay = one whole step without "
              "the host's token handling; TB/s = bytes that part must read / its time"]
    table = Table("GPT decode (bench/decode.py)",
                  ["batch", "path", "TTFT ms", "step ms", "tokens/s", "roofline tokens/s", "of roofline",
                   "weights-only", "GB read/step", "KV GB used/alloc", "mean ctx", "attention ms (TB/s)",
                   "matmuls ms (TB/s)", "graph replay ms"], rows, notes)
    report(table, device, args, {"runs": raw, "copy_bw": bw})


if __name__ == "__main__":
    main()
