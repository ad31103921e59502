"""The tier-2 glyph recipe's training step, eager against ``compile_vision`` (+ ``compile_gpt``): worth it?
And what does compiling SAM's and CLIP's blocks one by one (``unit="block"``) save of the compile?

The step is the trainer's with ``glyph_loss`` (``pipeline/train.py``): packed rows of line crops
(one global view each, in a mode without tiles), bf16 autocast, the next-token loss plus the
glyph heads' loss read through their hooks (``pipeline/glyph_loss.py``), backward, clipping,
Muon + AdamW. Views are noise and glyphs are random: the cost does not depend on content.
Compiling costs time once per view size (reported), then every step is cheaper; the table says
after how many steps it pays off.

    python bench/glyph_step.py                         # small preset, small mode, on CUDA
    python bench/glyph_step.py --variants eager/read1,eager/read10   # the loss read every step or every 10th
    python bench/glyph_step.py --mode base --variants compiled_gpt,blocks_gpt --warmup 1   # the compile's cost
    python bench/glyph_step.py --quick --device cpu    # tiny sizes: the code path
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common import Table, base_parser, build_model, mode_views, report, sync, training_step

from model.config import MODES, processor_config
from model.processor import global_slots
from pipeline.glyph_loss import ATTRIBUTE, GlyphHeads
from pipeline.glyphs import N_CLASSES
from pipeline.mixture import Sample, collate, pack_sequences
from pipeline.optim import build_optimizer

IMAGE_ID = 3


def line_batch(cfg, mode: str, rows: int, seq_len: int, response: int, rng: np.random.Generator):
    """``rows`` packed rows of line-crop samples (image slots + prompt + a short response) with glyphs."""
    slots = global_slots(processor_config(mode))
    size = MODES[mode]["base_size"]
    samples = []
    while sum(map(len, samples)) < rows * seq_len:
        ids = np.concatenate([[1], np.full(slots, IMAGE_ID), rng.integers(10, cfg.gpt.vocab_size, 8 + response)])
        mask = np.concatenate([np.zeros(slots + 9), np.ones(response)]).astype(np.uint8)
        n = int(rng.integers(10, 40))  # one text line's characters, left to right
        x = np.sort(rng.uniform(0, size, n))
        top = rng.uniform(0, size - 40)
        glyphs = np.stack([rng.integers(1, N_CLASSES, n), x, np.full(n, top), np.full(n, top + 32)], 1)
        samples.append(Sample(ids, mask, [mode_views(mode, rng)], "line", glyphs.astype(np.float32)))
    groups = list(pack_sequences(samples, seq_len))[:rows]
    return collate(groups, seq_len)


# variant -> (what it compiles, as the table says it; compile_vision's unit; compile_gpt)
TOWERS = {"eager": ("eager", None, False), "compiled": ("compile_vision", "tower", False),
          "compiled_gpt": ("compile_vision + compile_gpt", "tower", True),
          "blocks": ("compile_vision by block", "block", False),
          "blocks_gpt": ("compile_vision by block + compile_gpt", "block", True)}


def run(args, device: torch.device, towers: str, read_every: int) -> dict:
    rng = np.random.default_rng(args.seed)
    model = build_model(args.preset, device, seed=args.seed, image_token_id=IMAGE_ID)
    model.config.slot_centering = True
    heads = GlyphHeads(model.config).to(device)
    setattr(model, ATTRIBUTE, heads)
    heads.attach(model)  # before compiling, as the trainer does: the hooks are traced into the graphs
    _, unit, gpt = TOWERS[towers]
    if unit:
        model.compile_vision(0, unit=unit)
    if gpt:  # each GPT block too, as TrainConfig.compile_gpt does
        model.gpt.compile_blocks()
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)
    model.train()
    opt = build_optimizer(model, "muon", lr=1e-3, muon_lr=0.02, encoder_lr_scale=0.5)
    batch = line_batch(model.config, args.mode, args.rows, args.seq, args.response, rng)
    batch = batch.to(device, index_on_host=True)  # as the trainer moves it
    step = training_step(model, batch, opt, device, extra_loss=lambda: heads.loss(batch.glyphs)[0], read=False)

    def steps(n: int) -> list[float]:
        """``n`` steps; the loss read on the host (a wait for the device) every ``read_every``-th and
        the last, as the trainer reports every ``log_every`` steps and at the end."""
        read = []
        for i in range(n):
            loss = step()
            if (i + 1) % read_every == 0 or i == n - 1:
                read.append(float(loss))
        return read

    sync(device)
    t0 = time.perf_counter()
    losses = steps(args.warmup)  # the compile happens in the first
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses += steps(args.steps)
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    if not all(np.isfinite(losses)):
        raise RuntimeError(f"non-finite loss: {losses}")
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
    return dict(towers=towers, compiled=towers != "eager", read_every=read_every, views=len(batch.images),
                warm_s=warm_s, step_s=step_s, peak_gib=mem, loss=losses[-1], losses=losses)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--mode", default="small", help="a mode without tiles (the glyph loss reads global views)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--response", type=int, default=12, help="target tokens per line crop")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="eager,compiled",
                   help="eager, compiled (compile_vision), compiled_gpt (compile_vision + compile_gpt), blocks or "
                        "blocks_gpt (the same with compile_vision's unit 'block'), each optionally /readN: the loss "
                        "read every N steps (default 1)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.preset, args.mode, args.rows, args.seq, args.steps, args.warmup = "tiny", "tiny", 1, 1024, 1, 1
    results = []
    for variant in args.variants.split(","):
        towers, _, read = variant.partition("/read")
        if towers not in TOWERS or not (read == "" or read.isdigit() and int(read) >= 1):
            raise SystemExit(f"variant {variant!r}: expected one of {', '.join(TOWERS)}, optionally /readN")
        r = run(args, device, towers=towers, read_every=int(read or 1))
        print(r, flush=True)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    base = results[0]
    rows = []
    for r in results:
        gain = base["step_s"] - r["step_s"]
        extra = r["warm_s"] - base["warm_s"]
        pays = f"{extra / gain:.0f}" if r["compiled"] and not base["compiled"] and gain > 0 and extra > 0 else ""
        rows.append([TOWERS[r["towers"]][0], r["read_every"], f"{args.rows} x {args.seq}",
                     r["views"], f"{r['warm_s']:.1f}", f"{r['step_s'] * 1e3:.0f}", f"{r['views'] / r['step_s']:.0f}",
                     f"{base['step_s'] / r['step_s']:.2f}x", pays, f"{r['peak_gib']:.1f}", f"{r['loss']:.3f}"])
    table = Table("Glyph-loss training step (bench/glyph_step.py)",
                  ["compiled", "loss read every (steps)", "batch", "views/step", f"first {args.warmup} steps s",
                   "step ms", "views/s", "speed-up", "steps to pay off the compile", "peak GiB", "loss, last step"], rows,
                  [f"{args.preset} preset, {args.mode} mode, line crops ({args.response} target tokens each) packed "
                   f"into rows, glyph heads on; bf16 autocast, Muon + AdamW, clipping; {args.steps} timed steps "
                   f"after {args.warmup}"])
    report(table, device, args, {"runs": results})


if __name__ == "__main__":
    main()
