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
``sam`` the same without CLIP (the compressed SAM features alone through a projector); ``cnn``
replaces them with three 4x4 stride-4 convolutions (one vector per 64 x 64 cell), a control that
tells the encoder's share of the difficulty from the decoder's; ``oracle`` hands the decoder each
letter's identity in slot k directly (learned embeddings): how fast the decoder alone learns to
copy. ``-center`` turns on :attr:`model.config.VLMConfig.slot_centering`; ``-aux`` adds a
training-only loss (each slot the GPT reads predicts which letters lie in its 64 x 64 cell, a BCE
per letter, as ``bench/tier2_probe.py``'s ``*-aux`` variants do on pages); ``-grid`` instead asks each
slot for the letter under each of its 4 x 4 patches, in place (a balanced cross-entropy, as
``glyph_cell: grid`` in the trainer; the order inside a cell as well as the set); ``-patch`` adds a finer
one before the compressor: each 16 x 16 patch of SAM's neck names the letter whose centre lies in
it, or none (a cross-entropy over 27 classes, letter patches and empty patches weighted equally).

Options: ``--readout linear`` trains the encoder and the aux head alone, without the GPT (can the
encoder learn glyphs when the signal reaches it directly?); ``--encoder-lr-scale`` and
``--encoder-warmup-steps`` (SAM + CLIP held at lr 0 while the projector and the GPT learn their
random-init features; the ``cnn`` stem counts as decoder-side for both) change how the encoder
starts. Every 100 steps the log prints the *letter similarity*: the mean cosine similarity between
the slot vectors of the 26 letters, each drawn alone in one cell (1 = the encoder cannot tell any
two apart). Prints a table last (steps to a loss below 1 nat, final loss, aux loss, share of letter
patches the ``-patch`` head names wrong, CER) and writes ``micro.json`` under ``--out``.
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

from pipeline.glyph_loss import balanced_patch_loss  # noqa: E402
from pipeline.glyphs import CELL, PATCH, patches_by_cell  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
FLAGS = ("center", "aux", "grid", "patch")
PROMPT = "<image>\nFree OCR."
LAYOUTS = ("grid", "line")
ENCODERS = ("deep", "sam", "cnn", "oracle")


def parse_variant(name: str) -> dict:
    """``<layout>-<encoder>[-center][-aux|-grid][-patch]``, e.g. ``line-deep-center``."""
    parts = name.split("-")
    flags = parts[2:]
    if len(parts) < 2 or parts[0] not in LAYOUTS or parts[1] not in ENCODERS \
            or any(f not in FLAGS for f in flags) or len(set(flags)) != len(flags) \
            or flags != sorted(flags, key=FLAGS.index):
        raise ValueError(f"variant {name!r}: expected <{'|'.join(LAYOUTS)}>-<{'|'.join(ENCODERS)}>"
                         + "".join(f"[-{f}]" for f in FLAGS))
    if "patch" in flags and parts[1] not in ("deep", "sam"):
        raise ValueError(f"variant {name!r}: -patch needs SAM's neck (encoder deep or sam)")
    if "aux" in flags and "grid" in flags:
        raise ValueError(f"variant {name!r}: -aux and -grid are two targets for the same slot head: pick one")
    if "grid" in flags and parts[1] == "oracle":
        raise ValueError(f"variant {name!r}: -grid trains the slots of an image encoder, not the oracle's")
    return {"name": name, "layout": parts[0], "encoder": parts[1], **{f: f in flags for f in FLAGS}}


def random_text(rng: random.Random, layout: str, size: int) -> str:
    longest = size // CELL if layout == "grid" else 6
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, max(3, longest))))


def draw(text: str, layout: str, size: int, font_px: int,
         rng: random.Random) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([size, size, 3] uint8 black letters on white, [cells, 26] multi-hot: the letters whose
    centres fall in each vision slot's 64 x 64 cell, [patches] int64: the letter (1-26, 0 = none)
    whose centre falls in each 16 x 16 patch; both row-major)."""
    from PIL import Image, ImageDraw

    from pipeline.synth import get_font

    font = get_font("sans", 0, font_px)
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    g, gp = size // CELL, size // PATCH
    cells = np.zeros((g * g, len(LETTERS)), dtype=np.uint8)
    patches = np.zeros(gp * gp, dtype=np.int64)
    centres = []  # (letter, x, y) of each letter's centre
    if layout == "grid":
        row = rng.randrange(g)
        for k, c in enumerate(text):
            draw_in_cell(pen, c, font, font_px, k, row)
            centres.append((c, k * CELL + CELL / 2, row * CELL + CELL / 2 - 4))
    else:
        width = pen.textlength(text, font=font)
        x, y = rng.uniform(4, max(5.0, size - width - 4)), rng.uniform(4, size - font_px - 8)
        pen.text((x, y), text, fill="black", font=font)
        for k, c in enumerate(text):
            centres.append((c, x + pen.textlength(text[:k], font=font) + pen.textlength(c, font=font) / 2,
                            y + font_px / 2))
    for c, cx, cy in centres:
        cells[min(g - 1, int(cy // CELL)) * g + min(g - 1, int(cx // CELL)), LETTERS.index(c)] = 1
        patches[min(gp - 1, int(cy // PATCH)) * gp + min(gp - 1, int(cx // PATCH))] = LETTERS.index(c) + 1
    return np.asarray(image).copy(), cells, patches


def draw_in_cell(pen, c: str, font, font_px: int, col: int, row: int) -> None:
    """Letter ``c`` centred in grid cell (col, row), as the ``grid`` layout places its letters."""
    pen.text((col * CELL + (CELL - pen.textlength(c, font=font)) / 2, row * CELL + (CELL - font_px) / 2 - 4),
             c, fill="black", font=font)


class Strings(torch.utils.data.IterableDataset):
    """Endless batches of (ids, loss mask, image, text, cell letters, patch letters) of one layout,
    whole batches per DataLoader worker (one hand-over per batch, not per image); each worker its
    own seed."""

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
            drawn = [draw(t, self.layout, self.size, self.font_px, rng) for t in texts]
            yield ([np.asarray(ids) for ids, _ in rendered], [np.asarray(m) for _, m in rendered],
                   np.stack([d[0] for d in drawn]), texts, np.stack([d[1] for d in drawn]),
                   np.stack([d[2] for d in drawn]))


def build(variant: dict, vocab_size: int, image_token_id: int, size: int, device: torch.device,
          aux_bias: float = -4.5):
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
    if variant["aux"]:
        model.aux_head = nn.Linear(width, len(LETTERS))  # each slot: which letters lie in its cell
        nn.init.constant_(model.aux_head.bias, aux_bias)
    if variant["grid"]:  # each slot: which letter (0 = none) lies under each of its 4 x 4 patches
        model.aux_head = nn.Linear(width, (CELL // PATCH) ** 2 * (len(LETTERS) + 1))
    if variant["patch"]:  # each neck position: which letter's centre lies in its patch (0 = none)
        model.patch_head = nn.Conv2d(cfg.sam.neck_dim, len(LETTERS) + 1, 1)
        model.neck_out = []
        model.sam_model.neck.register_forward_hook(  # training passes only (probes and eval run without grad)
            lambda _m, _i, out: model.neck_out.append(out) if torch.is_grad_enabled() else None)
    if variant["encoder"] in ("cnn", "sam"):  # the stand-in in place of the towers + projector
        model._encode_view_batch = lambda views: center_slots(features(views)) if variant["center"] else features(views)
    return model.to(device)


def cell_logits(model: nn.Module, vision: list[torch.Tensor], size: int) -> torch.Tensor:
    """[images, cells, 26] aux-head logits of the global view's slots (the newline column dropped);
    [images, cells, 16 * 27] for a ``-grid`` head."""
    from model.vlm import global_view_slots

    return model.aux_head(torch.stack([global_view_slots(v, size // CELL) for v in vision]).float())


def patch_loss(model: nn.Module, patches: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(cross-entropy of the neck's patch letters, share of letter patches named wrong), from the neck
    outputs the last forward pass left (global views only: their order is the images')."""
    from pipeline.glyph_loss import balanced_patch_loss

    logits = model.patch_head(torch.cat(model.neck_out).float()).flatten(2).transpose(1, 2)  # [B, patches, 27]
    model.neck_out.clear()
    loss, wrong = balanced_patch_loss(logits, patches)
    return loss, float(wrong)


def oracle_embeddings(model: nn.Module, texts: list[str], n_slots: int, device: torch.device) -> list[torch.Tensor]:
    """Letter k's learned embedding in slot k (0 = empty): the decoder's task without the vision."""
    codes = torch.zeros(len(texts), n_slots, dtype=torch.long)
    for i, t in enumerate(texts):
        codes[i, :len(t)] = torch.tensor([LETTERS.index(c) + 1 for c in t])
    return list(model.oracle(codes.to(device)))


def letter_probe(size: int, font_px: int) -> torch.Tensor:
    """[26, 3, size, size] uint8: each letter alone in grid cell (1, 1), i.e. vision slot ``size // CELL + 1``."""
    from PIL import Image, ImageDraw

    from pipeline.synth import get_font

    font = get_font("sans", 0, font_px)
    views = []
    for c in LETTERS:
        image = Image.new("RGB", (size, size), "white")
        draw_in_cell(ImageDraw.Draw(image), c, font, font_px, 1, 1)
        views.append(torch.as_tensor(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(views)


@torch.no_grad()
def letter_similarity(model: nn.Module, probe: torch.Tensor, size: int) -> float:
    """Mean cosine similarity between the 26 letters' slot vectors (see :func:`letter_probe`)."""
    from model.processor import normalize

    slots = model._encode_view_batch(normalize(probe.to(model.image_newline.device)))[:, size // CELL + 1].float()
    unit = torch.nn.functional.normalize(slots, dim=-1)
    cos = unit @ unit.T
    return float(cos[~torch.eye(len(cos), dtype=torch.bool, device=cos.device)].mean())


def run(variant: dict, args, tokenizer_json: str, device: torch.device) -> dict:
    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.tokenizer import Tokenizer
    from model.vlm import ImageViews, slot_count
    from pipeline.metrics import cer
    from pipeline.mixture import Sample, collate
    from pipeline.optim import build_optimizer, lr_multiplier, set_lr

    tok = Tokenizer.load(tokenizer_json)
    n_slots = slot_count(args.size // CELL)
    model = build(variant, tok.vocab_size, tok.token_id("<image>"), args.size, device, args.aux_bias)
    oracle = variant["encoder"] == "oracle"
    linear = args.readout == "linear"
    opt = build_optimizer(model, "muon", args.lr, muon_lr=args.muon_lr, encoder_lr_scale=args.encoder_lr_scale)
    probe = None if oracle else letter_probe(args.size, args.font_px)
    data = iter(torch.utils.data.DataLoader(
        Strings(tokenizer_json, variant["layout"], args.size, args.font_px, args.batch_size, 0),
        batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None))
    start, ema, aux_ema, below_one, curve = time.perf_counter(), None, None, None, []
    patch_ema = patch_wrong = grid_wrong = None
    for step in range(args.steps):
        ids, masks, images, texts, cells, patches = next(data)
        samples = [Sample(i, m, [ImageViews.from_arrays(img, None)]) for i, m, img in zip(ids, masks, images)]
        batch = collate([[s] for s in samples], max(len(s) for s in samples)).to(device)
        set_lr(opt, lr_multiplier(step, args.steps, "constant", warmup=50),
               encoder_multiplier=0.0 if step < args.encoder_warmup_steps else 1.0)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vision = (oracle_embeddings(model, texts, n_slots, device) if oracle
                      else model.encode_images(batch.images))
            total = loss = torch.zeros((), device=device)
            if not linear:
                loss = model(batch.input_ids, targets=batch.targets, vision_embeds=vision, positions=batch.positions,
                             segment_ids=batch.segment_ids, loss_reduction="sum") / batch.n_target_tokens
                total = loss
            if variant["aux"]:
                aux = torch.nn.functional.binary_cross_entropy_with_logits(
                    cell_logits(model, vision, args.size), torch.as_tensor(cells, device=device).float())
                total = loss + aux
            if variant["grid"]:
                in_place = torch.as_tensor(patches_by_cell(np.asarray(patches), args.size), device=device)
                aux, wrong_t = balanced_patch_loss(
                    cell_logits(model, vision, args.size).unflatten(-1, (in_place.shape[-1], len(LETTERS) + 1)),
                    in_place)
                total = loss + aux
                wrong = float(wrong_t)
                grid_wrong = wrong if grid_wrong is None else 0.95 * grid_wrong + 0.05 * wrong
            if variant["aux"] or variant["grid"]:
                aux_value = float(aux.detach())
                aux_ema = aux_value if aux_ema is None else 0.95 * aux_ema + 0.05 * aux_value
            if variant["patch"]:
                p_loss, wrong = patch_loss(model, torch.as_tensor(patches, device=device))
                total = total + p_loss
                p_value = float(p_loss.detach())
                patch_ema = p_value if patch_ema is None else 0.95 * patch_ema + 0.05 * p_value
                patch_wrong = wrong if patch_wrong is None else 0.95 * patch_wrong + 0.05 * wrong
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if below_one is None and step >= 20 and ema < 1.0 and not linear:
            below_one = step
        if step % 100 == 0 or step == args.steps - 1:
            similarity = None if oracle else round(letter_similarity(model, probe, args.size), 4)
            curve.append((step, round(ema, 4), similarity))
            print(f"[{variant['name']}] step {step} loss(ema) {ema:.3f} "
                  f"{'' if aux_ema is None else f'aux {aux_ema:.3f} '}"
                  f"{'' if patch_ema is None else f'patch {patch_ema:.3f} (wrong {patch_wrong:.3f}) '}"
                  f"{'' if grid_wrong is None else f'slot patches wrong {grid_wrong:.3f} '}"
                  f"letter similarity {similarity} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    rng = random.Random("tier2-micro/eval")
    texts = [random_text(rng, variant["layout"], args.size) for _ in range(64)]
    if linear:  # no reading: how many letter cells (-grid: letter patches) the slot head gets right
        drawn = [draw(t, variant["layout"], args.size, args.font_px, rng) for t in texts]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            vision = model.encode_images([ImageViews.from_arrays(d[0], None) for d in drawn])
            logits = cell_logits(model, vision, args.size).float()
        if variant["grid"]:
            truth = patches_by_cell(np.stack([d[2] for d in drawn]), args.size)
            guessed = logits.unflatten(-1, (truth.shape[-1], len(LETTERS) + 1)).argmax(-1).cpu().numpy()
            scores = [float((guessed != truth)[truth > 0].mean())]
        else:
            truth = np.stack([d[1] for d in drawn]).astype(bool)
            occupied = truth.any(-1)
            scores = [1.0 - float(((logits > 0).cpu().numpy() == truth).all(-1)[occupied].mean())]  # the error
    elif oracle:  # no images to read: greedy copy through the GPT alone
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
                                                                          args.font_px, rng)[0], None)],
                                      params=SamplingParams(max_new_tokens=16)) for t in texts]
        results = engine.generate(requests)
        scores = [cer(r.text, t) for r, t in zip(results, texts)]
        for r, t in list(zip(results, texts))[:3]:
            print(f"[{variant['name']}] gt {t!r} read {r.text!r}", flush=True)
    return {**variant, "readout": args.readout, "steps": args.steps, "seconds": round(seconds, 1),
            "final_loss": round(ema, 4), "final_aux_loss": None if aux_ema is None else round(aux_ema, 4),
            "final_patch_loss": None if patch_ema is None else round(patch_ema, 4),
            "final_patch_wrong": None if patch_wrong is None else round(patch_wrong, 4),
            "final_grid_wrong": None if grid_wrong is None else round(grid_wrong, 4),
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
    parser.add_argument("--encoder-lr-scale", type=float, default=1.0, help="lr of SAM + CLIP / --lr")
    parser.add_argument("--encoder-warmup-steps", type=int, default=0,
                        help="steps with SAM + CLIP held still (the decoder learns their random-init features first)")
    parser.add_argument("--aux-bias", type=float, default=-4.5,
                        help="initial bias of the -aux head: the prior log-odds of a letter in a cell (~4.5 letters "
                             "in 16 cells x 26); from 0 it takes Adam hundreds of steps to get there once centering "
                             "has removed the slots' shared part")
    parser.add_argument("--readout", choices=("gpt", "linear"), default="gpt",
                        help="linear: train the encoder with the slot head's loss alone, no GPT (can it learn "
                             "glyphs?); the CER column is then the share of letter cells the -aux head gets wrong "
                             "(-grid: of letter patches)")
    parser.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="image-drawing processes (0: draw in the training process)")
    parser.add_argument("--out", default=os.environ.get("OUT", "artifacts/tier2_micro"))
    args = parser.parse_args(argv)
    if args.size % CELL or args.size < CELL:
        parser.error(f"--size must be a positive multiple of {CELL}")
    try:
        variants = [parse_variant(v) for v in args.variants.split(",")]
    except ValueError as e:
        parser.error(str(e))
    if args.readout == "linear" and not all((v["aux"] or v["grid"]) and v["encoder"] != "oracle" for v in variants):
        parser.error("--readout linear trains through the slot head: every variant needs -aux or -grid and an "
                     "image encoder")
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
          f"letters at {args.font_px} px, {args.readout} readout\n")
    print("| variant | layout | encoder | slot centering | steps to loss < 1 | final loss | final aux loss "
          "| patches wrong | slot patches wrong (-grid) | CER | train s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['name']} | {r['layout']} | {r['encoder']} | {'on' if r['center'] else 'off'} | "
              f"{r['steps_to_loss_below_1'] if r['steps_to_loss_below_1'] is not None else 'never'} | "
              f"{r['final_loss']:.3f} | {'-' if r['final_aux_loss'] is None else format(r['final_aux_loss'], '.3f')} | "
              f"{'-' if r['final_patch_wrong'] is None else format(r['final_patch_wrong'], '.3f')} | "
              f"{'-' if r['final_grid_wrong'] is None else format(r['final_grid_wrong'], '.3f')} | "
              f"{r['cer']:.3f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
