"""Tier-2 recipe probes: which data and resolution let a random-init model start reading soonest.

    python bench/tier2_probe.py --variants pages-small,lines-small-aux,curriculum-small-aux --seconds 120

Each variant trains the small preset for the same wall-clock budget on one GPU (no Ray: the
probe isolates the recipe from the pipeline), on samples rendered by DataLoader workers through
the same code as the training stream (:func:`pipeline.synth_stream.render_crops`, the mode's
processor, the tokenizer). The task is drawn per page as in the stream, but a ``line``/``word``
page gives up to ``--crops-per-page`` of its crops rather than one (rendering the page costs far
more than processing a crop), shuffled with the samples of a few other pages; in a mix of crops
and pages the crops thus outnumber the pages by about that factor. A variant may be a
curriculum: phases, each a share of the budget with its own task mix (its own DataLoader, on
fresh pages); the time a phase's workers take to deliver their first batch is not charged.

Then it reads fresh pages greedily and reports the character error rate: on the last phase's
mix (markdown read as free text), and on each of ``--eval-tasks`` alone (word crops, line crops,
whole pages; held-out pages of the same seed for every variant) to show at which level reading
emerged. A loss stuck at the language-model floor and a CER near 1 mean the model is not using
glyphs yet; the variant whose loss leaves that floor first is the one to spend the real budget
on. ``*-aux`` variants add a training-only loss: each vision slot predicts which characters lie
in its 64 x 64 cell, which tells apart "the encoder has not learned glyphs" from "the decoder
does not look"; ``*-aux-center-patch`` ones train the trainer's glyph heads instead
(:mod:`pipeline.glyph_loss`, ``glyph_loss`` in a stage-1 YAML): that cell loss with its bias at the
prior, and a finer one, each 16 x 16 patch of SAM's neck naming the character centred in it.
"data wait" is the share of the training time spent waiting for the next batch: near 0 the
variant is compute-bound, near 1 data-bound. Prints a table last and writes ``probe.json`` under
``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.glyph_loss import GlyphHeads  # noqa: E402
from pipeline.glyphs import N_CLASSES, cell_targets  # noqa: E402

# (share of the budget, tasks) of each phase
CURRICULUM = [(0.25, {"word": 1.0}), (0.35, {"line": 1.0}), (0.4, {"line": 0.5, "free": 0.25, "markdown": 0.25})]

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
    # words, then lines, then lines and whole pages: glyphs first where little else is to learn
    "curriculum-small": dict(mode="small", phases=CURRICULUM),
    "curriculum-small-aux": dict(mode="small", phases=CURRICULUM, aux=1.0),
    # the same with VLMConfig.slot_centering (bench/tier2_micro.py: a CNN-stem reader starts 2.7x sooner)
    "words-small-center": dict(mode="small", tasks={"word": 1.0}, center=True),
    "lines-small-center": dict(mode="small", tasks={"line": 1.0}, center=True),
    "pages-small-center": dict(mode="small", tasks={"free": 0.5, "markdown": 0.5}, center=True),
    "curriculum-small-center": dict(mode="small", phases=CURRICULUM, center=True),
    # both: the aux loss gives the encoder a direct glyph signal, centering lets the decoder see it
    "words-small-aux-center": dict(mode="small", tasks={"word": 1.0}, aux=1.0, center=True),
    "curriculum-small-aux-center": dict(mode="small", phases=CURRICULUM, aux=1.0, center=True),
    # the trainer's glyph heads (TrainConfig.glyph_loss): the aux cell loss with its bias at the prior, and the finer
    # target, each 16 px patch of SAM's neck naming its character (what makes lines read in bench/tier2_micro.py)
    "lines-small-aux-center-patch": dict(mode="small", tasks={"line": 1.0}, center=True, glyphs=1.0),
    "curriculum-small-aux-center-patch": dict(mode="small", phases=CURRICULUM, center=True, glyphs=1.0),
}


SHUFFLE_PAGES = 4  # a DataLoader worker shuffles the samples of this many pages together
EVAL_TASKS = ("word", "line", "free")


def phases(spec: dict) -> list[tuple[float, dict[str, float]]]:
    """(share of the budget, tasks) of each phase of a variant; a plain variant is one phase."""
    return spec.get("phases") or [(1.0, spec["tasks"])]


class _Rendered(torch.utils.data.IterableDataset):
    """Endless training samples of one stream, split across DataLoader workers by page index:
    every sample :func:`pipeline.synth_stream.render_crops` gives for a page (at most
    ``crops_per_page`` crops), in a seeded random order over ``SHUFFLE_PAGES`` pages at a time."""

    def __init__(self, stream, tokenizer_json: str, max_len: int, aux: bool = False,
                 crops_per_page: int | None = None, glyphs: bool = False) -> None:
        self.stream, self.tokenizer_json, self.max_len, self.aux = stream, tokenizer_json, max_len, aux
        self.crops_per_page, self.glyphs = crops_per_page, glyphs

    def __iter__(self):
        from model.processor import ImageProcessor
        from model.tokenizer import Tokenizer
        from model.vlm import ImageViews
        from pipeline.mixture import Sample
        from pipeline.synth_stream import render_crop_pieces, sample_glyphs

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        tok = Tokenizer.load(self.tokenizer_json)
        proc = ImageProcessor.from_mode(self.stream.mode)
        synth = self.stream.synth_config()
        rng = random.Random(f"tier2-probe-shuffle/{self.stream.seed}/{wid}")
        index = wid
        while True:
            pool = []
            for _ in range(SHUFFLE_PAGES):
                page, crops = render_crop_pieces(index, self.stream, synth, self.crops_per_page)
                pool += [(page, *crop) for crop in crops]
                index += nw
            rng.shuffle(pool)
            for page, piece, image, rec in pool:
                p = proc.process(image)
                ids, mask = tok.render_vision(rec["prompt"], rec["response"], p.n_image_tokens)
                if len(ids) > self.max_len:
                    continue
                views = ImageViews.from_processed(p)
                size = p.global_view.shape[0]
                glyphs = (sample_glyphs(page, piece, rec["task"], size, self.stream.crop_scale)
                          if self.aux or self.glyphs else None)
                if self.aux:
                    views.aux = torch.as_tensor(cell_targets(glyphs, size))
                yield Sample(np.asarray(ids), np.asarray(mask), [views], rec["task"],
                             glyphs if self.glyphs else None)  # as the stream's glyphs column gives them the trainer


def _eval_set(stream, tasks: dict[str, float], n: int):
    """``n`` fresh (image, record) of ``tasks``, one per held-out page of ``stream``'s seed."""
    from pipeline.synth_stream import render_record

    held = dataclasses.replace(stream, seed=stream.seed + 777_777, tasks=tasks)
    return [render_record(i, held) for i in range(n)]


def _free_reading(tasks: dict[str, float]) -> dict[str, float]:
    """The tasks (weights summing to 1) a model is scored on: markdown pages are read as plain text
    (its CER would count markup)."""
    kept = {t: w for t, w in tasks.items() if t != "markdown"} or {"free": 1.0}
    return {t: w / sum(kept.values()) for t, w in kept.items()}


def run_variant(name: str, spec: dict, args, tokenizer_json: str, device: torch.device) -> dict:
    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.processor import ImageProcessor
    from model.tokenizer import Tokenizer
    from model.vlm import ImageViews, global_view_slots
    from pipeline.metrics import cer
    from pipeline.mixture import batches
    from pipeline.optim import build_optimizer, lr_multiplier, set_lr
    from pipeline.prefetch import Prefetcher
    from pipeline.synth_stream import SynthStreamConfig
    from pipeline.train import TrainConfig, _build_model

    plan = phases(spec)
    base = SynthStreamConfig(profile="reading", pages=10**9, seed=args.seed, mode=spec["mode"],
                             tasks=plan[0][1], overrides=spec.get("overrides", {}))
    tok = Tokenizer.load(tokenizer_json)
    model = _build_model(TrainConfig(preset="small", seq_len=args.seq_len, seed=args.seed,
                                     slot_centering=bool(spec.get("center", False))), tok)  # as stage 1 does
    cfg = model.config
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)
    aux_weight = spec.get("aux", 0.0)
    aux_head = torch.nn.Linear(cfg.gpt.n_embd, N_CLASSES) if aux_weight else None
    if aux_head is not None:
        torch.nn.init.constant_(aux_head.bias, args.aux_bias)
        model.aux_head = aux_head  # trained with the model (AdamW group), never saved
    glyph_weight = spec.get("glyphs", 0.0)
    if glyph_weight:  # the trainer's glyph heads, as TrainConfig.glyph_loss trains them
        model.glyph_heads = GlyphHeads(cfg)
        model.glyph_heads.attach(model)
    model.to(device).train()
    lr = spec.get("lr", args.lr)
    opt = build_optimizer(model, "muon", lr, muon_lr=spec.get("muon_lr", args.muon_lr),
                          encoder_lr_scale=spec.get("encoder_lr_scale", args.encoder_lr_scale))

    def train_step(batch, step: int) -> tuple[float, float | None, float | None]:
        """One optimizer step; (loss per target token, aux (cell) loss or None, patch loss or None)."""
        set_lr(opt, lr_multiplier(step, 10**9, "constant", args.warmup))
        cells = [im.aux for im in batch.images] if aux_head is not None else None
        batch = batch.to(device)
        aux_value = patch_value = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vision = model.encode_images(batch.images)
            loss = model(batch.input_ids, targets=batch.targets, vision_embeds=vision, positions=batch.positions,
                         segment_ids=batch.segment_ids, loss_reduction="sum")
            total = loss / max(1, batch.n_target_tokens)
            if cells is not None:
                g = int(round(cells[0].shape[0] ** 0.5))
                grid = torch.stack([global_view_slots(v, g) for v in vision])
                aux_logits = aux_head(grid.float())
                aux_t = torch.stack(cells).to(device, non_blocking=True).float()
                aux_loss = torch.nn.functional.binary_cross_entropy_with_logits(aux_logits, aux_t)
                total = total + aux_weight * aux_loss
                aux_value = float(aux_loss.detach())
            if glyph_weight:
                glyph_loss, parts = model.glyph_heads.loss(batch.glyphs)
                total = total + glyph_weight * glyph_loss
                aux_value = float(parts["glyph_cell_loss"]) if parts else None
                patch_value = float(parts["glyph_patch_loss"]) if parts else None
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / max(1, batch.n_target_tokens), aux_value, patch_value

    shares = np.array([share for share, _ in plan], dtype=float)
    ends = np.cumsum(shares) / shares.sum() * args.seconds
    curve, step, samples, elapsed, waited = [], 0, 0, 0.0, 0.0
    ema, aux_ema, patch_ema = None, 0.0, 0.0
    for phase, ((_, tasks), end) in enumerate(zip(plan, ends)):
        # each phase on fresh pages: the same seed would render the previous phase's pages again
        stream = dataclasses.replace(base, seed=args.seed + 1_000_003 * phase, tasks=tasks)
        print(f"[{name}] phase {phase}: {tasks} until {end:.0f}s", flush=True)
        loader = torch.utils.data.DataLoader(
            _Rendered(stream, tokenizer_json, args.seq_len, bool(aux_weight), args.crops_per_page or None,
                      bool(glyph_weight)),
            batch_size=None, num_workers=args.workers, prefetch_factor=8, persistent_workers=False)
        # packing and collating 128 crops is main-process work: done ahead, as the trainer does
        data = Prefetcher(batches(iter(loader), args.seq_len, args.batch_size), depth=2)
        start = None
        while True:
            asked = time.perf_counter()
            batch = next(data)
            now = time.perf_counter()
            if start is None:
                start = now - elapsed  # the clock (re)starts once the workers deliver
            else:
                waited += now - asked
            elapsed = now - start
            if elapsed >= end:
                break
            value, aux_value, patch_value = train_step(batch, step)
            step += 1
            samples += batch.n_samples
            ema = value if ema is None else 0.95 * ema + 0.05 * value
            if aux_value is not None:
                aux_ema = aux_value if step == 1 else 0.95 * aux_ema + 0.05 * aux_value
            if patch_value is not None:
                patch_ema = patch_value if step == 1 else 0.95 * patch_ema + 0.05 * patch_value
            if step % 25 == 0:
                curve.append((step, round(elapsed, 1), round(ema, 4)))
                print(f"[{name}] step {step} t {elapsed:.0f}s loss(ema) {ema:.3f} aux {aux_ema:.4f} "
                      f"{f'patch {patch_ema:.3f} ' if glyph_weight else ''}"
                      f"samples {samples} ({samples / elapsed:.0f}/s, data wait {waited / elapsed:.0%})", flush=True)
        data.close()
        del loader, data
    if aux_head is not None:
        del model.aux_head
    if glyph_weight:
        model.glyph_heads.detach()
        del model.glyph_heads
    model.eval()
    engine = Engine(model, tok, device=device)
    proc = ImageProcessor.from_mode(base.mode)
    scored: dict[str, list[float]] = {}  # CERs by the JSON of the tasks read, so that no set is read twice

    def score(tasks: dict[str, float]) -> list[float]:
        """CER of each of ``args.eval_n`` held-out samples of ``tasks``, read greedily."""
        key = json.dumps(tasks, sort_keys=True)
        if key not in scored:
            evals = _eval_set(base, tasks, args.eval_n)
            requests = [GenerationRequest(rec["prompt"], [ImageViews.from_processed(proc.process(img))],
                                          params=SamplingParams(max_new_tokens=args.max_new_tokens))
                        for img, rec in evals]
            results = engine.generate(requests)
            scored[key] = [cer(r.text, rec["response"]) for r, (_, rec) in zip(results, evals)]
            for r, (_, rec) in list(zip(results, evals))[:2]:
                print(f"[{name}] {rec['task']} gt:   {rec['response'][:120]!r}\n"
                      f"[{name}] {rec['task']} pred: {r.text[:120]!r}", flush=True)
        return scored[key]

    cers = score(_free_reading(plan[-1][1]))
    by_task = {t: float(np.mean(score({t: 1.0}))) for t in args.eval_tasks}
    return {"variant": name, "mode": base.mode, "phases": plan, "steps": step, "samples": samples,
            "seconds": args.seconds, "samples_per_s": samples / max(elapsed, 1e-9),
            "data_wait": waited / max(elapsed, 1e-9), "final_loss_ema": ema, "cer": float(np.mean(cers)),
            "cer_below_0.5": sum(c < 0.5 for c in cers) / len(cers), "cer_by_task": by_task, "curve": curve}


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
    parser.add_argument("--aux-bias", type=float, default=0.0,
                        help="initial bias of the *-aux head; with centering, the prior's log-odds (about -4) "
                             "spares it a long walk there (bench/RESULTS.md, session 7)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--eval-n", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--crops-per-page", type=int, default=16,
                        help="line/word crops one rendered page gives at most (0: all of them)")
    parser.add_argument("--eval-tasks", default=",".join(EVAL_TASKS),
                        help=f"tasks also scored alone, comma-separated, from {EVAL_TASKS} ('' for none)")
    parser.add_argument("--out", default=os.environ.get("OUT", "artifacts/tier2_probe"))
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if args.crops_per_page < 0:
        parser.error(f"--crops-per-page must be >= 0, got {args.crops_per_page}")
    args.eval_tasks = [t for t in args.eval_tasks.split(",") if t]
    if set(args.eval_tasks) - set(EVAL_TASKS):
        parser.error(f"--eval-tasks must be some of {EVAL_TASKS}, got {args.eval_tasks}")
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
          f"{args.batch_size} x {args.seq_len}, up to {args.crops_per_page or 'all'} crops per page\n")
    head = ["variant", "mode", "steps", "samples", "samples/s", "data wait", "loss (ema)", "CER (own mix)", "CER < 0.5",
            *(f"CER {t}" for t in args.eval_tasks)]
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for r in results:
        row = [r["variant"], r["mode"], r["steps"], r["samples"], f"{r['samples_per_s']:.1f}",
               f"{100 * r['data_wait']:.0f}%", f"{r['final_loss_ema']:.3f}", f"{r['cer']:.3f}",
               f"{100 * r['cer_below_0.5']:.0f}%", *(f"{r['cer_by_task'][t]:.3f}" for t in args.eval_tasks)]
        print("| " + " | ".join(map(str, row)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
