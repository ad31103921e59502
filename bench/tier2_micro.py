"""Why a random-init model does not start reading: the smallest reading task, one change at a time.

    python bench/tier2_micro.py --variants grid-deep,grid-deep-center,line-deep-center --steps 1500

Each variant trains a small DeepEncoder + GPT from random init to read 3-6 random lowercase
letters drawn on a blank square (no language prior to fall back on: the loss can only go below
the letter-frequency floor by reading) and then reads 64 fresh images greedily. The layouts:

- ``grid``: one letter per 64 x 64 cell, in a random cell row: each vision slot holds at most
  one letter, aligned with its cell. The easiest case there is.
- ``line``: the string at a random position in the font's natural spacing: about 2-3 letters
  per slot at 40 px, at any phase against the cells, as on a page.

Encoders: ``deep`` is the model's own SAM + compressor + CLIP + projector (narrow widths);
``sam`` the same without CLIP (the compressed SAM features alone through a projector); ``cnn`` replaces them with three 4x4 stride-4 convolutions (one vector per 64 x 64 cell), a
control that tells the encoder's share of the difficulty from the decoder's. ``-center``
turns on :attr:`model.config.VLMConfig.slot_centering`. ``oracle`` hands the decoder each
letter's identity in slot k directly (learned embeddings): how fast the decoder alone learns to
copy. Prints a table last (steps to a loss below 1 nat, final loss, CER) and writes
``micro.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
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
from torch import nn  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CELL = 64  # input pixels per vision slot (16 px patches x the compressor's 4 per side)
PROMPT = "<image>\nFree OCR."
LAYOUTS = ("grid", "line")
ENCODERS = ("deep", "sam", "cnn", "oracle")


def parse_variant(name: str) -> dict:
    """``<layout>-<encoder>[-center]``, e.g. ``line-deep-center``."""
    parts = name.split("-")
    if len(parts) not in (2, 3) or parts[0] not in LAYOUTS or parts[1] not in ENCODERS \
            or (len(parts) == 3 and parts[2] != "center"):
        raise ValueError(f"variant {name!r}: expected <{'|'.join(LAYOUTS)}>-<{'|'.join(ENCODERS)}>[-center]")
    return {"name": name, "layout": parts[0], "encoder": parts[1], "center": len(parts) == 3}


def random_text(rng: random.Random, layout: str, size: int) -> str:
    longest = size // CELL if layout == "grid" else 6
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, max(3, longest))))


def draw(text: str, layout: str, size: int, font_px: int, rng: random.Random) -> np.ndarray:
    """[size, size, 3] uint8: black letters on white."""
    from PIL import Image, ImageDraw

    from pipeline.synth import get_font

    font = get_font("sans", 0, font_px)
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    if layout == "grid":
        row = rng.randrange(size // CELL)
        for k, c in enumerate(text):
            pen.text((k * CELL + (CELL - pen.textlength(c, font=font)) / 2, row * CELL + (CELL - font_px) / 2 - 4),
                     c, fill="black", font=font)
    else:
        width = pen.textlength(text, font=font)
        pen.text((rng.uniform(4, max(5.0, size - width - 4)), rng.uniform(4, size - font_px - 8)), text,
                 fill="black", font=font)
    return np.asarray(image).copy()


class Strings(torch.utils.data.IterableDataset):
    """Endless batches of (ids, loss mask, image, text) of one layout, whole batches per DataLoader
    worker (one hand-over per batch, not per image); each worker its own seed."""

    def __init__(self, tokenizer_json: str, layout: str, size: int, font_px: int, batch_size: int, seed: int) -> None:
        self.tokenizer_json, self.layout, self.size, self.font_px = tokenizer_json, layout, size, font_px
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        from model.tokenizer import Tokenizer
        from model.vlm import slot_count

        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"tier2-micro/{self.seed}/{info.id if info else 0}")
        torch.set_num_threads(1)
        tok = Tokenizer.load(self.tokenizer_json)
        n_slots = slot_count(self.size // CELL)
        while True:
            texts = [random_text(rng, self.layout, self.size) for _ in range(self.batch_size)]
            rendered = [tok.render_vision(PROMPT, t, n_slots) for t in texts]
            images = np.stack([draw(t, self.layout, self.size, self.font_px, rng) for t in texts])
            yield [np.asarray(ids) for ids, _ in rendered], [np.asarray(m) for _, m in rendered], images, texts


def build(variant: dict, vocab_size: int, image_token_id: int, size: int, device: torch.device):
    """The model of a variant; for ``sam``/``cnn`` the towers are swapped for the stand-in, ``oracle``
    gets its letter table."""
    from model.config import CLIPConfig, GPTConfig, SAMConfig, VLMConfig
    from model.vlm import NanoDeepseekOCR, center_slots

    cfg = VLMConfig(
        sam=SAMConfig(img_size=size, embed_dim=96, depth=4, num_heads=3, window_size=4, global_attn_indexes=(1, 3),
                      neck_dim=64, net2_dim=128, net3_dim=256),
        clip=CLIPConfig(hidden_size=256, num_layers=4, num_heads=4, ffn_hidden_size=1024),
        gpt=GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=4, n_head=4, n_kv_head=4, n_embd=256),
        image_token_id=image_token_id, slot_centering=variant["center"])
    torch.manual_seed(0)
    model = NanoDeepseekOCR(cfg)
    model.init_weights()
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # bypassed, as in training
    width = cfg.gpt.n_embd
    if variant["encoder"] == "cnn":
        model.stem = nn.Sequential(nn.Conv2d(3, 64, 4, 4), nn.GELU(), nn.Conv2d(64, 128, 4, 4), nn.GELU(),
                                   nn.Conv2d(128, width, 4, 4))
        features = lambda views: model.stem(views).flatten(2).transpose(1, 2)  # noqa: E731
    elif variant["encoder"] == "sam":
        model.sam_projector = nn.Linear(cfg.sam.net3_dim, width)
        features = lambda views: model.sam_projector(model.sam_model(views).flatten(2).transpose(1, 2))  # noqa: E731
    elif variant["encoder"] == "oracle":
        model.oracle = nn.Embedding(len(LETTERS) + 1, width)  # see oracle_embeddings
    if variant["encoder"] in ("cnn", "sam"):  # the stand-in in place of the towers + projector
        model._encode_view_batch = lambda views: center_slots(features(views)) if variant["center"] else features(views)
    return model.to(device)


def oracle_embeddings(model: nn.Module, texts: list[str], n_slots: int, device: torch.device) -> list[torch.Tensor]:
    """Letter k's learned embedding in slot k (0 = empty): the decoder's task without the vision."""
    codes = torch.zeros(len(texts), n_slots, dtype=torch.long)
    for i, t in enumerate(texts):
        codes[i, :len(t)] = torch.tensor([LETTERS.index(c) + 1 for c in t])
    return list(model.oracle(codes.to(device)))


def run(variant: dict, args, tokenizer_json: str, device: torch.device) -> dict:
    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.tokenizer import Tokenizer
    from model.vlm import ImageViews, slot_count
    from pipeline.metrics import cer
    from pipeline.mixture import Sample, collate
    from pipeline.optim import build_optimizer, lr_multiplier, set_lr

    tok = Tokenizer.load(tokenizer_json)
    n_slots = slot_count(args.size // CELL)
    model = build(variant, tok.vocab_size, tok.token_id("<image>"), args.size, device)
    oracle = variant["encoder"] == "oracle"
    opt = build_optimizer(model, "muon", args.lr, muon_lr=args.muon_lr, encoder_lr_scale=1.0)
    data = iter(torch.utils.data.DataLoader(
        Strings(tokenizer_json, variant["layout"], args.size, args.font_px, args.batch_size, 0),
        batch_size=None, num_workers=args.workers, prefetch_factor=4))
    start, ema, below_one, curve = time.perf_counter(), None, None, []
    for step in range(args.steps):
        ids, masks, images, texts = next(data)
        samples = [Sample(i, m, [ImageViews.from_arrays(img, None)]) for i, m, img in zip(ids, masks, images)]
        batch = collate([[s] for s in samples], max(len(s) for s in samples)).to(device)
        set_lr(opt, lr_multiplier(step, args.steps, "constant", warmup=50))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vision = (oracle_embeddings(model, texts, n_slots, device) if oracle
                      else model.encode_images(batch.images))
            loss = model(batch.input_ids, targets=batch.targets, vision_embeds=vision, positions=batch.positions,
                         segment_ids=batch.segment_ids, loss_reduction="sum") / batch.n_target_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if below_one is None and step >= 20 and ema < 1.0:
            below_one = step
        if step % 100 == 0 or step == args.steps - 1:
            curve.append((step, round(ema, 4)))
            print(f"[{variant['name']}] step {step} loss(ema) {ema:.3f} {time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    rng = random.Random("tier2-micro/eval")
    texts = [random_text(rng, variant["layout"], args.size) for _ in range(64)]
    if oracle:  # no images to read: greedy copy through the GPT alone
        scores = []
        with torch.no_grad():
            for t in texts:
                ids = torch.tensor([tok.render_vision_prompt(PROMPT, n_slots)], device=device)
                vis = oracle_embeddings(model, [t], n_slots, device)
                out = []
                for _ in range(12):
                    nxt = int(model.gpt(inputs_embeds=model.merge_embeddings(ids, vis))[0, -1].argmax())
                    if nxt == tok.eos_id:
                        break
                    out.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
                scores.append(cer(tok.decode(out), t))
    else:
        engine = Engine(model, tok, device=device)
        requests = [GenerationRequest(PROMPT, [ImageViews.from_arrays(draw(t, variant["layout"], args.size,
                                                                          args.font_px, rng), None)],
                                      params=SamplingParams(max_new_tokens=16)) for t in texts]
        results = engine.generate(requests)
        scores = [cer(r.text, t) for r, t in zip(results, texts)]
        for r, t in list(zip(results, texts))[:3]:
            print(f"[{variant['name']}] gt {t!r} read {r.text!r}", flush=True)
    return {**variant, "steps": args.steps, "seconds": round(seconds, 1), "final_loss": round(ema, 4),
            "steps_to_loss_below_1": below_one, "cer": round(float(np.mean(scores)), 4), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="grid-oracle,grid-cnn,grid-cnn-center,grid-deep,grid-deep-center,"
                                              "line-deep,line-deep-center")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 64)")
    parser.add_argument("--font-px", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--out", default=os.environ.get("OUT", "artifacts/tier2_micro"))
    args = parser.parse_args(argv)
    if args.size % CELL or args.size < CELL:
        parser.error(f"--size must be a positive multiple of {CELL}")
    try:
        variants = [parse_variant(v) for v in args.variants.split(",")]
    except ValueError as e:
        parser.error(str(e))
    from model.tokenizer import Tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random("tier2-micro/tokenizer")
    # a near character-level BPE: random letters leave few merges worth making
    tokenizer_json = str(Tokenizer.train([random_text(rng, "line", args.size) for _ in range(3000)], 300)
                         .save(out / "tokenizer"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for v in variants:
        results.append(run(v, args, tokenizer_json, device))
        (out / "micro.json").write_text(json.dumps(results, indent=1))
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"\n### Tier-2 micro probe — {dev}, {args.steps} steps x {args.batch_size} images of {args.size} px, "
          f"letters at {args.font_px} px\n")
    print("| variant | layout | encoder | slot centering | steps to loss < 1 | final loss | CER | train s |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['layout']} | {r['encoder']} | {'on' if r['center'] else 'off'} | "
              f"{r['steps_to_loss_below_1'] if r['steps_to_loss_below_1'] is not None else 'never'} | "
              f"{r['final_loss']:.3f} | {r['cer']:.3f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
