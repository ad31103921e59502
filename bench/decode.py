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

from model.engine import DecodeBatch, SamplingParams


def prompts(n: int, length: int, width: int, device, dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(length + (i % 7), width, generator=g).to(device, dtype) for i in range(n)]


def kv_bytes_per_position(model) -> int:
    g = model.config.gpt
    return g.n_layer * 2 * g.n_kv_head * g.head_dim * torch.finfo(model.gpt.lm_head.weight.dtype).bits // 8


def check(model, device, dtype, eos: int) -> list[str]:
    """Fast path vs eager path on the same prompts: one step's logits, then greedy agreement."""
    width = model.config.gpt.n_embd
    ps = prompts(4, 40, width, device, dtype, seed=1)
    params = SamplingParams(max_new_tokens=64, ngram_size=0, stop_ids=frozenset({-1}))
    out = {}
    for fast in (False, True):
        b = DecodeBatch(model, 4, 200, eos, device, dtype, fast=fast)
        toks = {i: [ev.token_id] for i, ev in enumerate(b.add([(i, p, params) for i, p in enumerate(ps)]))}
        while b.active:
            for ev in b.step():
                toks[ev.request_id].append(ev.token_id)
        out[fast] = toks
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
    return notes


def run_batch(model, device, dtype, batch: int, prefix: int, new: int, eos: int, fast: bool, bw: float):
    width = model.config.gpt.n_embd
    ps = prompts(batch, prefix, width, device, dtype, seed=batch)
    params = SamplingParams(max_new_tokens=new + 2, ngram_size=0, stop_ids=frozenset({-1}))
    b = DecodeBatch(model, batch, prefix + new + 32, eos, device, dtype, fast=fast)
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
    q = torch.randn(B, cfg.n_head, cfg.head_dim, device=b.device, dtype=dtype)
    n_keys = dec.lengths + 1
    kv_pos = kv_bytes_per_position(model)
    attn_bytes = int(n_keys.sum()) * kv_pos

    def attention():
        for i in range(cfg.n_layer):
            dec.kernels.decode_attention(q, b.cache.k[i], b.cache.v[i], n_keys, dec.scratch)

    h = torch.randn(B, cfg.n_embd, device=b.device, dtype=dtype)
    m = torch.randn(B, 4 * cfg.n_embd, device=b.device, dtype=dtype)

    def gemms():
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


SWEEP = [(64, 4, 512), (64, 8, 512), (32, 4, 512), (128, 8, 512), (64, 4, 256), (64, 8, 1024), (128, 4, 512)]


@torch.inference_mode()
def sweep(model, device, dtype, eos: int, prefix: int, bw: float, out_path: str) -> list[list[object]]:
    """Time the split-K attention kernels (all layers, in a CUDA graph) for launch settings at
    batch 128 and 1; the best at batch 128 is written as NANO_OCR_DECODE_ATTN's value."""
    import model.gpt as gpt_module

    saved = dict(gpt_module.DECODE_ATTENTION)
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
            gpt_module.DECODE_ATTENTION.update(block_n=block_n, num_warps=warps, max_split=max_split)
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
        gpt_module.DECODE_ATTENTION.clear()
        gpt_module.DECODE_ATTENTION.update(saved)
    if out_path and best:
        with open(out_path, "w") as f:
            f.write(best[1])
    print(f"best at batch 128: {best[1]} ({best[0] * 1e3:.3f} ms)", flush=True)
    return rows


def path_name(fast: bool, device) -> str:
    if not fast:
        return "eager GPT.forward"
    return "CUDA graph + Triton" if device.type == "cuda" else "fast path, torch ops"


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
    p.add_argument("--check", action="store_true")
    p.add_argument("--sweep", default="", help="time attention launch settings; write the best to this file, exit")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.preset, args.batches, args.prefix, args.new, args.eager = "tiny", "1,4", 60, 12, "1"
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
    notes = check(model, device, dtype, eos) if args.check else []
    rows, raw = [], []
    runs = [(b, True) for b in map(int, args.batches.split(","))]
    runs += [(b, False) for b in map(int, args.eager.split(","))] if args.eager else []
    for batch, fast in runs:
        free_memory(device)
        try:
            r = run_batch(model, device, dtype, batch, args.prefix, args.new, eos, fast, bw)
        except Exception as exc:
            if not is_oom(exc):
                raise
            rows.append([batch, path_name(fast, device), "OOM"] + [""] * 11)
            continue
        raw.append(r)
        print(r, flush=True)
        rows.append([batch, path_name(fast, device), f"{r['ttft_ms']:.1f}", f"{r['step_ms']:.3f}",
                     f"{r['tok_s']:,.0f}", f"{r['roof_tok_s']:,.0f}", f"{100 * r['eff']:.0f}%",
                     f"{100 * r['weights_only_eff']:.0f}%", f"{r['bytes_per_step_gb']:.2f}",
                     f"{r['kv_used_gb']:.2f} / {r['kv_alloc_gb']:.2f}", f"{r['context']:.0f}",
                     _part(r, "attn"), _part(r, "gemm"),
                     f"{r['graph_step_ms']:.3f}" if "graph_step_ms" in r else ""])
    import model.gpt as gpt_module

    notes += [f"decode attention launch settings {gpt_module.DECODE_ATTENTION}"]
    notes += [f"model: {args.preset} preset GPT ({model.config.gpt.n_layer} layers, width {model.config.gpt.n_embd}), "
              f"{str(dtype).replace('torch.', '')} weights and KV cache, random weights; prefix {args.prefix}-{args.prefix + 6} "
              f"tokens of vision-like embeddings; {args.new} decode steps per batch (3 warm-up)",
              f"roofline: (matrix weights read once + each row's KV cache read once) / measured copy bandwidth "
              f"{bw / 1e12:.2f} TB/s; 'of roofline' = roofline step time / measured step time; "
              f"'weights-only' counts the weights alone (the batch-1 target's definition)",
              "TTFT = prefill of the whole batch + first token on the host",
              "parts (CUDA graphs of one kind of work, all layers): attention = the split-K decode kernels over "
              "each row's KV; matmuls = every weight matrix at this batch; graph replay = one whole step without "
              "the host's token handling; TB/s = bytes that part must read / its time"]
    table = Table("GPT decode (bench/decode.py)",
                  ["batch", "path", "TTFT ms", "step ms", "tokens/s", "roofline tokens/s", "of roofline",
                   "weights-only", "GB read/step", "KV GB used/alloc", "mean ctx", "attention ms (TB/s)",
                   "matmuls ms (TB/s)", "graph replay ms"], rows, notes)
    report(table, device, args, {"runs": raw, "copy_bw": bw})


if __name__ == "__main__":
    main()
