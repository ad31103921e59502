"""Stage-1 training step: tokens/s, step time, peak memory and MFU.

The step is the trainer's (``pipeline/train.py``) in one process: fp32 master weights, bf16
autocast, ``model(input_ids, images, targets, positions=, segment_ids=, loss_reduction="sum")``
on a packed batch from ``pipeline.mixture.collate``, backward of the mean loss, gradient
clipping, fused AdamW (``pipeline.optim.build_optimizer``), and the trainer's one host read of the
loss. Each packed row of ``--seq`` tokens holds two A4 Gundam pages (903 vision slots + prompt +
~1000 response tokens each) and a text sample. The batch is already on the device (the loader's
host-to-device copy is not timed).

MFU = model FLOPs per step / step time / the datasheet's dense bf16 peak, where the model FLOPs
are the vision encoder's (3x its forward: SAM + compressor + CLIP + projector) plus the GPT's
(6 x matrix params per token + causal attention within each packed sample).

    python bench/train_step.py                  # full and small presets on CUDA
    python bench/train_step.py --preset tiny --quick --device cpu
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import (Table, a4_page, autocast_for, base_parser, build_model, datasheet_peak, free_memory, is_oom,
                    matmul_peak, median, report, sync, timed, training_step)

from model.flops import gpt_train_flops, image_flops, segment_lengths
from pipeline.mixture import Sample, collate, pack_sequences
from pipeline.optim import build_optimizer

IMAGE_ID = 3


def make_batch(cfg, rows: int, seq_len: int, rng: np.random.Generator, response: int = 1000, text_pieces: int = 1):
    """``rows`` packed rows: per row two A4 pages (+ prompt + response) and ``text_pieces`` text
    samples filling up."""
    vocab = cfg.gpt.vocab_size
    page_views = a4_page(rng)

    def ids(n):
        x = rng.integers(10, vocab, n)
        x[x == IMAGE_ID] = 11
        return x

    samples = []
    for _ in range(rows):
        used = 0
        for _ in range(2):
            prompt = np.concatenate([[1], np.full(903, IMAGE_ID), ids(8)])
            resp = ids(response)
            s_ids = np.concatenate([prompt, resp])
            if used + len(s_ids) > seq_len:
                break
            mask = np.concatenate([np.zeros(len(prompt)), np.ones(len(resp))]).astype(np.uint8)
            samples.append(Sample(s_ids, mask, [page_views], "page"))
            used += len(s_ids)
        text = max(16 * text_pieces, seq_len - used - int(rng.integers(0, 40)))
        for i in range(text_pieces):
            n = text // text_pieces + (text % text_pieces if i == 0 else 0)
            samples.append(Sample(ids(n), np.ones(n, dtype=np.uint8), [], "text"))
    groups = list(pack_sequences(samples, seq_len))
    if len(groups) != rows:
        raise RuntimeError(f"packing made {len(groups)} rows, wanted {rows}")
    return collate(groups, seq_len), samples


def run(preset: str, rows: int, seq_len: int, steps: int, warmup: int, device, args, dense: bool = False,
        sam_bias: bool = False, compile_chunk: int | None = None, compile_gpt: bool = False) -> dict:
    import model.gpt as gpt_module
    from model.sam import SAMAttention

    saved, saved_fwd = gpt_module._VARLEN, SAMAttention.forward
    if dense:
        gpt_module._VARLEN = False  # force the dense-mask SDPA path (the pre-fast-path baseline)
    if sam_bias:
        from encoder import bias_rel_pos_forward

        SAMAttention.forward = bias_rel_pos_forward  # SAM's old dense-bias attention (the baseline)
    try:
        return _run(preset, rows, seq_len, steps, warmup, device, args, compile_chunk, compile_gpt)
    finally:
        gpt_module._VARLEN, SAMAttention.forward = saved, saved_fwd


def _run(preset: str, rows: int, seq_len: int, steps: int, warmup: int, device, args,
         compile_chunk: int | None = None, compile_gpt: bool = False) -> dict:
    rng = np.random.default_rng(args.seed)
    model = build_model(preset, device, seed=args.seed, image_token_id=IMAGE_ID)  # fp32 master weights
    if compile_chunk is not None:
        model.compile_vision(compile_chunk)  # chunks of views (0: one call per view size, dynamic count)
    if compile_gpt:  # each transformer block compiled on its own (TrainConfig.compile_gpt)
        model.gpt.compile_blocks()
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # bypassed, as in the trainer
    model.train()
    opt = build_optimizer(model, "adamw", lr=1e-4)  # fused on CUDA
    params = [p for p in model.parameters() if p.requires_grad]
    batch, _ = make_batch(model.config, rows, seq_len, rng)
    batch = batch.to(device, index_on_host=True)  # as the trainer moves it
    autocast = autocast_for(device)
    step = training_step(model, batch, opt, device)
    if args.vary_layout:  # the trainer's case: every step packs differently (segment count and lengths)
        step = varying_layout_step(model, rows, seq_len, rng, opt, device, warmup + steps)
    graphs = _compiled_graphs()
    losses = [step() for _ in range(warmup)]
    graphs_warmup = _compiled_graphs() - graphs
    phases = breakdown(model, batch, opt, params, autocast, device) if args.breakdown else {}
    if args.profile and device.type == "cuda":
        from encoder import top_kernels

        print(f"--- top kernels of one {preset} training step", flush=True)
        print(top_kernels(step, device, n=25), flush=True)
    sync(device)
    graphs = _compiled_graphs()
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    sync(device)
    step_s = (time.perf_counter() - t0) / steps
    graphs_timed = _compiled_graphs() - graphs
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    cfg = model.config
    seg = segment_lengths(batch.segment_ids)
    pages = len(batch.images)
    vision = 3 * sum(image_flops(cfg, im) for im in batch.images)
    gpt = gpt_train_flops(cfg, seg)
    tokens = batch.input_ids.numel()
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
    del model, opt, batch
    return dict(preset=preset, rows=rows, seq=seq_len, tokens=tokens, pages=pages, step_s=step_s,
                tok_s=tokens / step_s, flops=vision + gpt, vision_flops=vision, gpt_flops=gpt,
                achieved=(vision + gpt) / step_s, peak_gib=mem, loss=losses[-1], graphs_warmup=graphs_warmup,
                graphs_timed=graphs_timed, **phases)


def _compiled_graphs() -> int:
    """Graphs torch.compile has built so far in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def varying_layout_step(model, rows: int, seq_len: int, rng: np.random.Generator, opt, device, n: int):
    """A step function that trains on a different packed batch each call (``n`` of them, made up
    front): responses of 200-1000 tokens and 1-3 text samples a row, so the segment count and
    the longest segment change from step to step, as they do in the trainer."""
    steps = []
    for _ in range(n):
        batch, _ = make_batch(model.config, rows, seq_len, rng, response=int(rng.integers(200, 1001)),
                              text_pieces=int(rng.integers(1, 4)))
        steps.append(training_step(model, batch.to(device, index_on_host=True), opt, device))
    calls = iter(steps)
    return lambda: next(calls)()


def breakdown(model, batch, opt, params, autocast, device) -> dict:
    """Milliseconds of each part of a step, run alone: vision towers forward+backward (SAM alone
    too), the GPT forward+backward on the same packed rows, and clip + optimizer step."""
    from model.vlm import normalize

    def vision():
        with autocast:
            embeds = model.encode_images(batch.images)
        sum(e.float().square().mean() for e in embeds).backward()

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    views = [normalize(torch.cat([im.global_view[None] for im in batch.images]).to(device), dtype)]
    tiles = [im.tiles for im in batch.images if im.tiles.shape[0]]
    views += [normalize(torch.cat(tiles).to(device), dtype)] if tiles else []

    def sam():
        with autocast:
            out = [model.sam_model(v) for v in views]
        sum(o.float().square().mean() for o in out).backward()

    embeds = torch.randn(*batch.input_ids.shape, model.config.gpt.n_embd, device=device)

    def gpt():
        with autocast:
            loss = model.gpt(targets=batch.targets, inputs_embeds=embeds, positions=batch.positions,
                             segment_ids=batch.segment_ids, loss_reduction="sum")
        (loss / max(1, batch.n_target_tokens)).backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    out = {}
    for name, fn in (("vision_ms", vision), ("sam_ms", sam), ("gpt_ms", gpt)):
        out[name] = median(timed(fn, device, repeat=3, warmup=0)) * 1e3
        if name == "gpt_ms":  # the gradients exist now
            out["optimizer_ms"] = median(timed(optimizer, device, repeat=3, warmup=0)) * 1e3
        opt.zero_grad(set_to_none=True)
    print(f"step parts (ms, each alone): {out}", flush=True)
    return out


def check_varlen(device) -> str:
    """Packed-segment attention: varlen flash path vs the dense-mask path (loss and gradients)."""
    import model.gpt as gpt_module
    from model.config import GPTConfig
    from model.gpt import GPT

    if device.type != "cuda" or gpt_module._varlen_causal_fn() is None:
        return "check: varlen flash attention not available here (dense-mask path only)"
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=1024, vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, n_embd=256)).to(device)
    gpt.init_weights()
    with torch.no_grad():
        for p in gpt.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    B, T = 2, 1024
    idx = torch.randint(0, 512, (B, T), device=device)
    seg = torch.tensor([[0] * 300 + [1] * 500 + [2] * 200 + [-1] * 24, [0] * 1000 + [-1] * 24], device=device)
    pos = torch.cat([torch.arange(n) for n in (300, 500, 200, 24, 1000, 24)]).view(B, T).to(device)
    out = {}
    for name, fn in (("dense", False), ("varlen", None)):
        saved = gpt_module._VARLEN
        if fn is False:
            gpt_module._VARLEN = False
        try:
            gpt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = gpt(idx, idx, positions=pos, segment_ids=seg, loss_reduction="sum")
            loss.backward()
            out[name] = (loss.detach().float(), torch.cat([p.grad.flatten() for p in gpt.parameters()]))
        finally:
            gpt_module._VARLEN = saved
    dl = ((out["dense"][0] - out["varlen"][0]).abs() / out["dense"][0].abs()).item()
    dg = ((out["dense"][1] - out["varlen"][1]).norm() / out["dense"][1].norm()).item()
    msg = f"check: packed attention varlen vs dense mask (bf16): loss rel diff {dl:.1e}, grad rel diff {dg:.1e}"
    print(msg, flush=True)
    if not (dl < 2e-2 and dg < 5e-2):
        raise AssertionError(msg)
    return msg


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--presets", default="full:2,small:4", help="preset:rows,...")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dense-baseline", default="full", help="presets also timed with the dense-mask attention")
    p.add_argument("--sam-bias", default="", help="presets also timed with SAM's old dense-bias attention")
    p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the step's parts alone: vision (and SAM) fwd+bwd, GPT fwd+bwd, optimizer")
    p.add_argument("--compile-vision", default="", metavar="PRESETS",
                   help="presets also timed with the vision towers compiled in static chunks of views")
    p.add_argument("--compile-gpt", default="", metavar="PRESETS",
                   help="presets also timed with the vision towers (dynamic view count) and each GPT block compiled")
    p.add_argument("--vary-layout", action="store_true",
                   help="a differently packed batch every step (as in the trainer) instead of one repeated; the "
                        "FLOPs and tokens/s are still those of the first batch's layout")
    p.add_argument("--sam-global", default="", metavar="PATHS",
                   help="run every job once per CUDA path of SAM's global-block attention "
                        "(model.sam.SAM_ATTENTION_PATHS); '' = the product's choice (model.sam.CUDA_REL_POS_PATH)")
    p.add_argument("--compile-chunk", type=int, default=0,
                   help="views per compiled vision chunk (0: one call per view size, the view count dynamic)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.presets, args.seq, args.steps, args.warmup, args.dense_baseline = "tiny:1", 2048, 1, 1, "tiny"
    peak = datasheet_peak(device)
    measured = matmul_peak(device)
    notes = [check_varlen(device)] if device.type == "cuda" else []
    rows, raw = [], []
    jobs = [(spec.split(":")[0], int(spec.split(":")[1]), "") for spec in args.presets.split(",")]
    jobs += [(name, r, "dense") for name, r, _ in jobs if name in args.dense_baseline.split(",")]
    jobs += [(name, r, "sambias") for name, r, v in jobs if not v and name in args.sam_bias.split(",")]
    jobs += [(name, r, "compiled") for name, r, v in jobs if not v and name in args.compile_vision.split(",")]
    jobs += [(name, r, "compiled_gpt") for name, r, v in jobs if not v and name in args.compile_gpt.split(",")]
    import model.gpt as gpt_module
    import model.sam as sam_module

    fast_label = "varlen flash" if device.type == "cuda" and gpt_module._varlen_causal_fn() else "dense mask"
    default_global = sam_module.CUDA_REL_POS_PATH["global"]
    sam_paths = [x for x in args.sam_global.split(",") if x] or [default_global]
    unknown = sorted(set(sam_paths) - set(sam_module.SAM_ATTENTION_PATHS))
    if unknown:
        raise SystemExit(f"--sam-global: unknown paths {unknown}; choose from {sam_module.SAM_ATTENTION_PATHS}")
    for name, n_rows, variant, sam_global in [(*job, path) for job in jobs for path in sam_paths]:
        sam_module.CUDA_REL_POS_PATH["global"] = sam_global
        dense = variant == "dense"
        label = {"dense": "dense mask", "sambias": fast_label + ", SAM dense-bias attention",
                 "compiled": f"{fast_label}, vision compiled "
                             + (f"(chunks of {args.compile_chunk})" if args.compile_chunk else "(dynamic view count)"),
                 "compiled_gpt": f"{fast_label}, vision compiled (dynamic view count), GPT blocks compiled",
                 }.get(variant, fast_label)
        if variant != "sambias" and device.type == "cuda":
            label += f", SAM global blocks: {sam_global}"
        r = None
        while r is None and n_rows >= 1:
            free_memory(device)
            try:
                r = run(name, n_rows, args.seq, args.steps, args.warmup, device, args, dense=dense,
                        sam_bias=variant == "sambias",
                        compile_chunk=(args.compile_chunk if variant == "compiled"
                                       else 0 if variant == "compiled_gpt" else None),
                        compile_gpt=variant == "compiled_gpt")
            except Exception as exc:
                if not is_oom(exc):
                    raise
                print(f"{name} with {n_rows} rows: out of memory", flush=True)
                rows.append([name, f"{n_rows} x {args.seq}", label, "OOM"] + [""] * 8)
                n_rows //= 2
        if r is None:
            continue
        raw.append({**r, "variant": variant or "default", "sam_global": sam_global})
        print(r, flush=True)
        mfu = f"{100 * r['achieved'] / peak:.1f}%" if peak else "n/a"
        mfu_measured = f"{100 * r['achieved'] / measured:.1f}%"
        rows.append([name, f"{n_rows} x {args.seq}", label,
                     f"{r['step_s'] * 1e3:.0f}", f"{r['tok_s']:,.0f}", f"{r['pages'] / r['step_s']:.1f}",
                     f"{r['flops'] / 1e12:.1f} ({100 * r['vision_flops'] / r['flops']:.0f}% vision)",
                     f"{r['achieved'] / 1e12:.0f}", mfu, mfu_measured, f"{r['peak_gib']:.1f}",
                     f"{r['graphs_warmup']} / {r['graphs_timed']}"])
        if "vision_ms" in r:
            notes.append(f"{name} ({label}), parts run alone: vision towers fwd+bwd {r['vision_ms']:.0f} ms "
                         f"({r['vision_flops'] / r['vision_ms'] / 1e9:.0f} TFLOP/s; SAM alone {r['sam_ms']:.0f} ms), "
                         f"GPT fwd+bwd {r['gpt_ms']:.0f} ms ({r['gpt_flops'] / r['gpt_ms'] / 1e9:.0f} TFLOP/s), "
                         f"clip + optimizer {r['optimizer_ms']:.0f} ms; step {r['step_s'] * 1e3:.0f} ms")
    sam_module.CUDA_REL_POS_PATH["global"] = default_global
    notes += [f"packed rows: 2 A4 Gundam pages (903 slots + 8 prompt + 1000 response tokens each) + a text sample; "
              f"fp32 weights, bf16 autocast, fused AdamW, grad clipping; {args.steps} timed steps after {args.warmup}"
              + ("; a differently packed batch every step (responses 200-1000 tokens, 1-3 text samples a row; "
                 "FLOPs counted on the first)" if args.vary_layout else "; the same batch every step"),
              f"MFU against the datasheet dense bf16 peak ({peak / 1e12:.0f} TFLOP/s)" if peak else "MFU: no datasheet peak",
              f"'of measured' against the measured 8192^3 bf16 matmul rate ({measured / 1e12:.0f} TFLOP/s)",
              "dense mask = the same step with the packed-segment fast path switched off (SDPA with a [B,1,T,T] mask)"]
    table = Table("Stage-1 training step (bench/train_step.py)",
                  ["preset", "batch", "attention", "step ms", "tokens/s", "pages/s", "TFLOP/step", "TFLOP/s",
                   "MFU", "of measured", "peak GiB", "graphs compiled (warm-up / timed)"], rows, notes)
    report(table, device, args, {"runs": raw, "datasheet_peak": peak, "matmul_peak": measured})


if __name__ == "__main__":
    main()
