"""Vision encoder throughput per resolution mode: images/s and ms per image at batch 1/8/32.

One "image" is what the processor makes of it in that mode: a single view for tiny/small/base/
large, and for gundam an A4 page (1024 global view + 2x3 tiles of 640 = 903 slots). Each batch is
one ``NanoDeepseekOCR.encode_images`` call (SAM + compressor + CLIP + projector + slot layout),
bf16 weights, inference mode. The achieved rate counts the forward FLOPs of ``vision_flops``.

    python bench/encoder.py
    python bench/encoder.py --preset tiny --quick --device cpu
"""

from __future__ import annotations

import numpy as np
import torch

from common import (Table, base_parser, build_model, datasheet_peak, free_memory, is_oom, median, mode_views, report,
                    timed)

from model.config import MODES
from model.flops import image_flops


def bias_rel_pos_forward(self, x: torch.Tensor) -> torch.Tensor:
    """SAMAttention.forward as it was before the flash path: the decomposed relative positions
    materialised as a [b, heads, N, N] additive bias (what the CPU still runs); the baseline of
    the A/B comparison."""
    import torch.nn.functional as F

    from model.sam import decomposed_rel_pos_bias

    b, h, w, c = x.shape
    qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


def top_kernels(fn, device, n: int = 18) -> str:
    """The ``n`` CUDA kernels with the most self time over one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    lines = [f"total CUDA kernel time {total / 1e3:.1f} ms"]
    for e in events[:n]:
        lines.append(f"{e.self_device_time_total / 1e3:8.2f} ms {100 * e.self_device_time_total / total:5.1f}% "
                     f"x{e.count:<5d} {e.key[:110]}")
    return "\n".join(lines)


def experiments(model, device, args) -> list[list[object]]:
    """Gundam pages at batch 8: SAM's old dense-bias attention vs the flash path, then torch.compile
    (with kernel profiles of both eager variants on CUDA)."""
    import time

    from model.sam import SAMAttention

    rng = np.random.default_rng(1)
    pages = [mode_views("gundam", rng)] * 8
    base = [mode_views("base", rng)] * 8
    out_rows = []
    with torch.inference_mode():
        dev_pages = [im.to(device) for im in pages]
        dev_base = [im.to(device) for im in base]
        original = SAMAttention.forward
        SAMAttention.forward = bias_rel_pos_forward
        try:
            ref = model.encode_images(dev_pages[:2])
            if device.type == "cuda":
                print(top_kernels(lambda: model.encode_images(dev_pages), device), flush=True)
            t0 = median(timed(lambda: model.encode_images(dev_pages), device, repeat=args.repeat))
            b0 = median(timed(lambda: model.encode_images(dev_base), device, repeat=args.repeat))
        finally:
            SAMAttention.forward = original
        out_rows.append(["SAM rel-pos as a dense bias (the CPU path)", f"{t0 / 8 * 1e3:.2f}", f"{b0 / 8 * 1e3:.2f}",
                         "", ""])
        got = model.encode_images(dev_pages[:2])
        rel = max(((a.float() - r.float()).norm() / r.float().norm()).item() for a, r in zip(got, ref))
        t1 = median(timed(lambda: model.encode_images(dev_pages), device, repeat=args.repeat))
        b1 = median(timed(lambda: model.encode_images(dev_base), device, repeat=args.repeat))
        out_rows.append(["rel-pos folded into flash attention (CUDA default)", f"{t1 / 8 * 1e3:.2f}",
                         f"{b1 / 8 * 1e3:.2f}", f"{rel:.1e}", ""])
        if device.type == "cuda":
            print(top_kernels(lambda: model.encode_images(dev_pages), device), flush=True)
        if args.compile:
            sam_fwd, clip_fwd = model.sam_model.forward, model.vision_model.forward
            model.sam_model.forward = torch.compile(sam_fwd, dynamic=False)
            model.vision_model.forward = torch.compile(clip_fwd, dynamic=False)
            try:
                t_c = time.perf_counter()
                model.encode_images(dev_pages)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t_c
                t2 = median(timed(lambda: model.encode_images(dev_pages), device, repeat=args.repeat))
                out_rows.append(["+ torch.compile(SAM, CLIP)", f"{t2 / 8 * 1e3:.2f}", "", "",
                                 f"{compile_s:.0f}"])
            finally:
                model.sam_model.forward, model.vision_model.forward = sam_fwd, clip_fwd
    return out_rows


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="full")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--experiments", action="store_true", help="profile + A/B of encoder speed-ups (gundam, batch 8)")
    p.add_argument("--compile", action="store_true", help="with --experiments: also time torch.compile")
    args = p.parse_args()
    if args.quick:
        args.preset, args.batches, args.repeat = "tiny", "1,2", 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.preset, device, dtype, seed=args.seed).eval()
    peak = datasheet_peak(device)
    rng = np.random.default_rng(args.seed)
    rows, raw = [], []
    if args.experiments:
        exp = experiments(model, device, args)
        report(Table("Vision encoder speed-ups (bench/encoder.py --experiments)",
                     ["variant", "gundam ms/page (batch 8)", "base ms/image (batch 8)", "rel. diff vs eager",
                      "compile s"], exp,
                     ["same pages and weights as below; rel. diff = |out - eager| / |eager| of the vision embeddings"]),
               device, args, {"experiments": exp})
    for mode in args.modes.split(","):
        views = mode_views(mode, rng)
        flops = image_flops(model.config, views)
        for batch in map(int, args.batches.split(",")):
            images = [views] * batch
            free_memory(device)
            try:
                with torch.inference_mode():
                    device_images = [im.to(device) for im in images]
                    times = timed(lambda: model.encode_images(device_images), device, repeat=args.repeat, warmup=1)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                rows.append([mode, batch, "OOM", "", "", "", ""])
                continue
            t = median(times)
            mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
            rate = flops * batch / t
            r = dict(mode=mode, batch=batch, s=t, images_per_s=batch / t, ms_per_image=t / batch * 1e3,
                     tflops=rate / 1e12, peak_gib=mem)
            raw.append(r)
            print(r, flush=True)
            rows.append([mode, batch, f"{batch / t:,.1f}", f"{t / batch * 1e3:.2f}", f"{flops / 1e9:,.0f}",
                         f"{rate / 1e12:.0f}" + (f" ({100 * rate / peak:.0f}%)" if peak else ""), f"{mem:.1f}"])
    notes = [f"model: {args.preset} preset DeepEncoder, random weights, {str(dtype).replace('torch.', '')}; "
             f"median of {args.repeat} calls after one warm-up; images already on the device as uint8",
             "gundam = one A4 page: 1024 global view + 6 tiles of 640 (903 slots); the other modes are one view",
             "TFLOP/s counts forward matrix and attention FLOPs (model/flops.py vision_flops); % of the "
             "datasheet dense bf16 peak"]
    table = Table("Vision encoder (bench/encoder.py)",
                  ["mode", "batch", "images/s", "ms/image", "GFLOP/image", "TFLOP/s", "peak GiB"], rows, notes)
    report(table, device, args, {"runs": raw})


if __name__ == "__main__":
    main()
