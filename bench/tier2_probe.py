"""Tier-2 recipe probes: which data and resolution let a random-init model start reading soonest.

    python bench/tier2_probe.py --variants pages-small,pages-base,lines-small --seconds 120

Each variant trains the small preset for the same wall-clock budget on one GPU (no Ray: the
probe isolates the recipe from the pipeline), on pages rendered by DataLoader workers through
the same code as the training stream (:func:`pipeline.synth_stream.render_record`, the mode's
processor, the tokenizer). Then it reads fresh pages of its own distribution greedily and
reports the character error rate. A loss stuck at the language-model floor and a CER near 1
mean the model is not using glyphs yet; the variant whose loss leaves that floor first is the
one to spend the real budget on. ``*-aux`` variants add a training-only loss: each vision slot
predicts which characters lie in its 64 x 64 cell, which tells apart "the encoder has not learned
glyphs" from "the decoder does not look". Prints a table last and writes ``probe.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS: dict[str, dict] = {
    # the session-2 recipe: whole pages in the 640 px `small` mode (100 slots)
    "pages-small": dict(mode="small", tasks={"free": 0.5, "markdown": 0.5}),
    # the same pages in the 1024 px `base` mode (256 slots): about one text line per slot row
    "pages-base": dict(mode="base", tasks={"free": 0.5, "markdown": 0.5}),
    # one line of a page per sample, `small` mode: reading without having to find the line
    "lines-small": dict(mode="small", tasks={"line": 1.0}),
    "lines-base": dict(mode="base", tasks={"line": 1.0}),
    # half lines, half pages, `base` mode
    "mix-base": dict(mode="base", tasks={"line": 0.5, "free": 0.25, "markdown": 0.25}),
    # auxiliary loss: every slot of the view also predicts which characters lie in its cell
    "pages-small-aux": dict(mode="small", tasks={"free": 0.5, "markdown": 0.5}, aux=1.0),
    "pages-base-aux": dict(mode="base", tasks={"free": 0.5, "markdown": 0.5}, aux=1.0),
    "lines-small-aux": dict(mode="small", tasks={"line": 1.0}, aux=1.0),
    "words-small-aux": dict(mode="small", tasks={"word": 1.0}, aux=1.0),
    "mix-small-aux": dict(mode="small", tasks={"line": 0.5, "free": 0.5}, aux=1.0),
    # bigger type on the page, `small` mode
    "bigfont-small": dict(mode="small", tasks={"free": 0.5, "markdown": 0.5},
                          overrides={"font_size_range": [40, 52], "min_chars_per_line": 14}),
}


CHARSET = [chr(c) for c in range(33, 127)]  # printable ASCII without space; anything else is the last class
CHAR_INDEX = {c: i for i, c in enumerate(CHARSET)}
CELL = 64  # model-input pixels one slot covers (patch 16 x the 16x compressor's 4 per side)


def cell_char_targets(page, view_size: int) -> np.ndarray:
    """[g*g, len(CHARSET)+1] multi-hot: the characters whose centres fall in each slot's cell of
    the global view (the page padded to a centred square and resized, as the processor does)."""
    g = view_size // CELL
    w, h = page.size
    m = max(w, h)
    scale = view_size / m
    ox, oy = (m - w) / 2, (m - h) / 2
    out = np.zeros((g * g, len(CHARSET) + 1), dtype=np.uint8)
    for piece in page.words:
        x1, y1, x2, y2 = piece.box_px
        chars = [c for c in piece.text if not c.isspace()]
        if not chars:
            continue
        inset = (y2 - y1) / 4  # a glyph counts in every cell row its middle half reaches
        rows = range(max(0, int((y1 + inset + oy) * scale // CELL)), min(g - 1, int((y2 - inset + oy) * scale // CELL)) + 1)
        step = (x2 - x1) / len(chars)
        for k, c in enumerate(chars):
            col = min(g - 1, max(0, int((x1 + (k + 0.5) * step + ox) * scale // CELL)))
            for row in rows:
                out[row * g + col, CHAR_INDEX.get(c, len(CHARSET))] = 1
    return out


def crop_targets(page, task: str, piece_id: str, view_size: int) -> np.ndarray:
    """:func:`cell_char_targets` of a ``line``/``word`` crop: the words inside it, moved into
    the crop's own coordinates (the box :func:`pipeline.synth.piece_crop` cuts)."""
    from types import SimpleNamespace

    from pipeline.synth import TextPiece, piece_crop_box, readable_pieces

    k = int(piece_id.rsplit(task, 1)[1])
    piece = readable_pieces(page.lines if task == "line" else page.words)[k]
    cx1, cy1, cx2, cy2 = piece_crop_box(page.size, piece)
    inside = [piece]
    if task == "line":
        x1, y1, x2, y2 = piece.box_px
        inside = [w for w in page.words if w.box_px[0] >= x1 - 1 and w.box_px[2] <= x2 + 1
                  and y1 <= (w.box_px[1] + w.box_px[3]) / 2 <= y2]
    moved = [TextPiece(w.text, (w.box_px[0] - cx1, w.box_px[1] - cy1, w.box_px[2] - cx1, w.box_px[3] - cy1))
             for w in inside]
    return cell_char_targets(SimpleNamespace(size=(cx2 - cx1, cy2 - cy1), words=moved), view_size)


class _Rendered(torch.utils.data.IterableDataset):
    """Endless training samples of one stream, split across DataLoader workers by index."""

    def __init__(self, stream, tokenizer_json: str, max_len: int, aux: bool = False) -> None:
        self.stream, self.tokenizer_json, self.max_len, self.aux = stream, tokenizer_json, max_len, aux

    def __iter__(self):
        from model.processor import ImageProcessor
        from model.tokenizer import Tokenizer
        from model.vlm import ImageViews
        from pipeline.mixture import Sample
        from pipeline.synth_stream import render_sample

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        tok = Tokenizer.load(self.tokenizer_json)
        proc = ImageProcessor.from_mode(self.stream.mode)
        synth = self.stream.synth_config()
        index = wid
        while True:
            page, image, rec = render_sample(index, self.stream, synth)
            p = proc.process(image)
            ids, mask = tok.render_vision(rec["prompt"], rec["response"], p.n_image_tokens)
            if len(ids) <= self.max_len:
                views = ImageViews.from_processed(p)
                if self.aux:
                    size = p.global_view.shape[0]
                    cells = (crop_targets(page, rec["task"], rec["id"], size) if rec["task"] in ("line", "word")
                             else cell_char_targets(page, size))
                    views.aux = torch.as_tensor(cells)
                yield Sample(np.asarray(ids), np.asarray(mask), [views], rec["task"])
            index += nw


def _eval_set(stream, n: int):
    """``n`` fresh (image, task, prompt, response) of the stream's distribution, free reading only."""
    from pipeline.synth_stream import render_record

    tasks = {t: w for t, w in stream.tasks.items() if t != "markdown"} or {"free": 1.0}
    held = dataclasses.replace(stream, seed=stream.seed + 777_777, tasks=tasks)
    return [render_record(i, held) for i in range(n)]


def run_variant(name: str, spec: dict, args, tokenizer_json: str, device: torch.device) -> dict:
    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.processor import ImageProcessor
    from model.tokenizer import Tokenizer
    from model.vlm import ImageViews
    from pipeline.metrics import cer
    from pipeline.mixture import batches
    from pipeline.optim import build_optimizer, lr_multiplier, set_lr
    from pipeline.synth_stream import SynthStreamConfig
    from pipeline.train import TrainConfig, _build_model

    stream = SynthStreamConfig(profile="reading", pages=10**9, seed=args.seed, mode=spec["mode"],
                               tasks=spec["tasks"], overrides=spec.get("overrides", {}))
    tok = Tokenizer.load(tokenizer_json)
    model = _build_model(TrainConfig(preset="small", seq_len=args.seq_len, seed=args.seed), tok)  # as stage 1 does
    cfg = model.config
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)
    aux_weight = spec.get("aux", 0.0)
    aux_head = torch.nn.Linear(cfg.gpt.n_embd, len(CHARSET) + 1) if aux_weight else None
    if aux_head is not None:
        model.aux_head = aux_head  # trained with the model (AdamW group), never saved
    model.to(device).train()
    lr = spec.get("lr", args.lr)
    opt = build_optimizer(model, "muon", lr, muon_lr=spec.get("muon_lr", args.muon_lr),
                          encoder_lr_scale=spec.get("encoder_lr_scale", args.encoder_lr_scale))
    loader = torch.utils.data.DataLoader(_Rendered(stream, tokenizer_json, args.seq_len, bool(aux_weight)), batch_size=None,
                                         num_workers=args.workers, prefetch_factor=8, persistent_workers=False)
    data = batches(iter(loader), args.seq_len, args.batch_size)
    curve, step, samples, t0 = [], 0, 0, None
    ema = None
    aux_ema = 0.0
    while True:
        batch = next(data)
        if t0 is None:
            t0 = time.perf_counter()  # the clock starts once the workers deliver
        elapsed = time.perf_counter() - t0
        if elapsed >= args.seconds:
            break
        set_lr(opt, lr_multiplier(step, 10**9, "constant", args.warmup))
        cells = [im.aux for im in batch.images] if aux_head is not None else None
        batch = batch.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vision = model.encode_images(batch.images)
            loss = model(batch.input_ids, targets=batch.targets, vision_embeds=vision, positions=batch.positions,
                         segment_ids=batch.segment_ids, loss_reduction="sum")
            total = loss / max(1, batch.n_target_tokens)
            if cells is not None:
                g = int(round(cells[0].shape[0] ** 0.5))
                grid = torch.stack([v[:g * (g + 1)].view(g, g + 1, -1)[:, :g].reshape(g * g, -1) for v in vision])
                aux_logits = aux_head(grid.float())
                aux_t = torch.stack(cells).to(device, non_blocking=True).float()
                aux_loss = torch.nn.functional.binary_cross_entropy_with_logits(aux_logits, aux_t)
                total = total + aux_weight * aux_loss
                aux_ema = float(aux_loss.detach()) if step == 0 else 0.95 * aux_ema + 0.05 * float(aux_loss.detach())
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        samples += batch.n_samples
        value = float(loss) / max(1, batch.n_target_tokens)
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % 25 == 0:
            curve.append((step, round(elapsed, 1), round(ema, 4)))
            print(f"[{name}] step {step} t {elapsed:.0f}s loss(ema) {ema:.3f} aux {aux_ema:.4f} samples {samples}",
                  flush=True)
    del loader, data
    if aux_head is not None:
        del model.aux_head
    model.eval()
    engine = Engine(model, tok, device=device)
    proc = ImageProcessor.from_mode(stream.mode)
    evals = _eval_set(stream, args.eval_n)
    requests = [GenerationRequest(rec["prompt"], [ImageViews.from_processed(proc.process(img))],
                                  params=SamplingParams(max_new_tokens=args.max_new_tokens)) for img, rec in evals]
    results = engine.generate(requests)
    cers = [cer(r.text, rec["response"]) for r, (_, rec) in zip(results, evals)]
    for r, (_, rec) in list(zip(results, evals))[:3]:
        print(f"[{name}] gt:   {rec['response'][:120]!r}\n[{name}] pred: {r.text[:120]!r}", flush=True)
    return {"variant": name, "mode": stream.mode, "tasks": stream.tasks, "steps": step, "samples": samples,
            "seconds": args.seconds, "final_loss_ema": ema, "cer": sum(cers) / len(cers),
            "cer_below_0.5": sum(c < 0.5 for c in cers) / len(cers), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="pages-small,pages-base,lines-small")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--encoder-lr-scale", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--eval-n", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", default=os.environ.get("OUT", "artifacts/tier2_probe"))
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    from model.tokenizer import Tokenizer
    from pipeline.synth_stream import SynthStreamConfig, stream_texts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = stream_texts(SynthStreamConfig(profile="reading", seed=args.seed), 300)
        Tokenizer.train(texts, args.vocab_size).save(tok_dir)
    results = []
    for name in args.variants.split(","):
        results.append(run_variant(name, VARIANTS[name], args, str(tok_dir / "tokenizer.json"), device))
        (out / "probe.json").write_text(json.dumps(results, indent=1))
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n### Tier-2 probes — {dev}, small preset, {args.seconds:.0f} s of training each, batch "
          f"{args.batch_size} x {args.seq_len}\n")
    print("| variant | mode | steps | samples | loss (ema) | CER (fresh, greedy) | CER < 0.5 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['mode']} | {r['steps']} | {r['samples']} | {r['final_loss_ema']:.3f} | "
              f"{r['cer']:.3f} | {100 * r['cer_below_0.5']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
