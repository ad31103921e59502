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

from common import (Table, base_parser, build_model, datasheet_peak, free_memory, image_flops, is_oom, median,
                    mode_views, report, timed)

from model.config import MODES


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="full")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    if args.quick:
        args.preset, args.batches, args.repeat = "tiny", "1,2", 1
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.preset, device, dtype, seed=args.seed).eval()
    peak = datasheet_peak(device)
    rng = np.random.default_rng(args.seed)
    rows, raw = [], []
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
             "TFLOP/s counts forward matrix and attention FLOPs (bench/common.py vision_flops); % of the "
             "datasheet dense bf16 peak"]
    table = Table("Vision encoder (bench/encoder.py)",
                  ["mode", "batch", "images/s", "ms/image", "GFLOP/image", "TFLOP/s", "peak GiB"], rows, notes)
    report(table, device, args, {"runs": raw})


if __name__ == "__main__":
    main()
