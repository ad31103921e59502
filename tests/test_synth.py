"""Synthetic pages: determinism, manifest schema, targets that agree with the pixels, held-out split."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.grounding import parse_grounding, to_markdown
from pipeline import synth
from pipeline.synth import (
    PROMPT_FREE,
    PROMPT_GROUNDING,
    SynthConfig,
    block_pieces,
    generate,
    load_corpus,
    make_page,
    piece_crop_box,
    read_manifest,
    synth_main,
    text_records,
)

ALL_TASKS = ("markdown", "free", "line", "word", "block")


@pytest.fixture(scope="module")
def doc_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("doc")
    generate(out, 6, SynthConfig.document(tasks=ALL_TASKS, noise_prob=0.5), seed=7)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path, doc_dir):
    generate(tmp_path / "a", 6, SynthConfig.document(tasks=ALL_TASKS, noise_prob=0.5), seed=7)
    a, b = _files(tmp_path / "a"), _files(doc_dir)
    assert a.keys() == b.keys() and a == b
    generate(tmp_path / "c", 2, SynthConfig.document(), seed=8)
    c = _files(tmp_path / "c")
    assert c["images/train-s8-000000.png"] != a["images/train-s7-000000.png"]


def test_manifest_schema(doc_dir):
    recs = _records(doc_dir)
    assert len({r["id"] for r in recs}) == len(recs)
    assert {r["task"] for r in recs} == set(ALL_TASKS)
    for r in recs:
        assert {"id", "image", "prompt", "response", "task", "split", "page"} <= r.keys()
        assert not Path(r["image"]).is_absolute() and r["image"].startswith("images/")
        assert (doc_dir / r["image"]).is_file()
        assert r["prompt"].startswith("<image>\n") and r["response"].strip()
        assert r["prompt"] == (PROMPT_GROUNDING if r["task"] == "markdown" else PROMPT_FREE)
        if r["task"] in ("markdown", "free"):
            assert r["boxes"] and all(set(b) == {"label", "box"} and len(b["box"]) == 4 for b in r["boxes"])
    assert all(Path(r["image"]).is_absolute() for r in read_manifest(doc_dir / "manifest.jsonl"))


def test_grounding_targets_parse_back(doc_dir):
    for r in _records(doc_dir):
        if r["task"] != "markdown":
            continue
        parsed = parse_grounding(r["response"])
        assert parsed.warnings == []
        assert [(b.label, list(b.box)) for b in parsed.boxes] == [(b["label"], b["box"]) for b in r["boxes"]]
        assert set(parsed.labels) <= {"title", "text", "list", "table", "image"}
        assert "<|" not in to_markdown(r["response"])


def test_page_targets_agree():
    for i in range(4):
        page = make_page(i, SynthConfig.document(), seed=3)
        assert len(page.blocks) == len(parse_grounding(page.grounding).boxes) >= 1
        assert to_markdown(page.grounding) == page.markdown
        texts = [b.text for b in page.blocks if b.text]
        assert page.plain_text == "\n\n".join(texts)
        for b in page.blocks:
            if b.label == "title":
                assert b.markdown.startswith("# ") or b.markdown.startswith("## ")
            if b.label == "list":
                assert all(re.match(r"(- |\d+\. )", ln) for ln in b.markdown.splitlines())


def _dark(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L")) < 110


@pytest.mark.parametrize("profile", ["document", "easy"])
def test_boxes_cover_the_ink(profile):
    """Every box lies in the page and holds ink; (almost) no ink lies outside all boxes."""
    cfg = SynthConfig.from_profile(profile, noise=0.0)
    for i in range(5):
        page = make_page(i, cfg, seed=11)
        w, h = page.size
        dark = _dark(page.image)
        covered = np.zeros_like(dark)
        for b in page.blocks:
            x1, y1, x2, y2 = parse_grounding(page.grounding).boxes[page.blocks.index(b)].to_pixels(w, h)
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            assert dark[y1:y2, x1:x2].sum() > 20, (i, b.label)
            covered[y1:y2, x1:x2] = True
            # the 0..999 box is a close fit of the pixel box (at most ~1 unit of slack per side)
            px = b.box_px
            assert abs(x1 - px[0]) <= w / 999 + 1 and abs(y2 - px[3]) <= h / 999 + 1
        assert (dark & ~covered).sum() <= 0.001 * dark.sum(), i


def test_no_overlapping_blocks():
    cfg = SynthConfig.document(noise=0.0, columns=(2,), width_range=(1000, 1200))
    for i in range(3):
        page = make_page(i, cfg, seed=5)
        boxes = [b.box_px for b in page.blocks]
        for a in range(len(boxes)):
            for c in range(a + 1, len(boxes)):
                A, C = boxes[a], boxes[c]
                ix = min(A[2], C[2]) - max(A[0], C[0])
                iy = min(A[3], C[3]) - max(A[1], C[1])
                assert ix <= 4 or iy <= 4, (i, page.blocks[a].label, page.blocks[c].label)
        # reading order: left column top to bottom, then the right column
        body = page.blocks[1:] if page.blocks[0].markdown.startswith("# ") else page.blocks
        keys = [(b.box_px[0] > page.size[0] // 2, b.box_px[1]) for b in body]
        assert keys == sorted(keys)


def test_text_is_readable_size():
    for profile, minimum in (("document", 12), ("easy", 20)):
        cfg = SynthConfig.from_profile(profile)
        for i in range(4):
            page = make_page(i, cfg, seed=2)
            heights = [ln.box_px[3] - ln.box_px[1] for ln in page.lines]
            assert heights and min(heights) >= minimum, (profile, i, min(heights))


def test_noise_and_rotation_change_pixels_not_targets():
    clean = make_page(0, SynthConfig.easy(noise=0.0), seed=6)
    noisy = make_page(0, SynthConfig.easy(noise=1.0, noise_prob=1.0), seed=6)
    tilted = make_page(0, SynthConfig.easy(noise=0.0, rotation_deg=2.0), seed=6)
    assert noisy.grounding == clean.grounding == tilted.grounding
    a, n, t = (np.asarray(p.image).astype(int) for p in (clean, noisy, tilted))
    assert 1.0 < np.abs(a - n).mean() < 10.0  # mild
    assert np.abs(a - t).mean() > 1.0
    assert np.array_equal(n, np.asarray(make_page(0, SynthConfig.easy(noise=1.0, noise_prob=1.0), seed=6).image))


def test_tables_are_html():
    cfg = SynthConfig.document(block_weights={"table": 1.0}, page_title_prob=0.0)
    page = make_page(0, cfg, seed=1)
    tables = [b for b in page.blocks if b.label == "table"]
    assert tables
    for t in tables:
        assert re.fullmatch(r"<table>(<tr>(<td>[^<>|]+</td>){2,}</tr>){2,}</table>", t.markdown), t.markdown
        assert t.markdown in page.grounding


def test_figures_are_image_blocks():
    cfg = SynthConfig.document(block_weights={"image": 1.0}, page_title_prob=0.0, noise=0.0)
    page = make_page(0, cfg, seed=1)
    assert page.blocks and {b.label for b in page.blocks} == {"image"}
    assert page.plain_text == ""
    assert page.markdown.split("\n\n")[0] == "![](images/0.jpg)"
    arr = np.asarray(page.image)
    x1, y1, x2, y2 = page.blocks[0].box_px
    assert arr[y1:y2, x1:x2].std() > 10  # something was drawn


def test_heldout_uses_other_text_and_fonts():
    train, held = load_corpus("train"), load_corpus("heldout")
    assert not set(train.sentences) & set(held.sentences)
    assert not set(train.titles) & set(held.titles)
    assert len(held.sentences) > 50
    cfg = SynthConfig.document()
    train_sents = set(train.sentences)
    fonts = set()
    for i in range(6):
        page = make_page(i, cfg, seed=0, split="heldout")
        fonts.add(page.font_family)
        for b in page.blocks:
            if b.label == "text":
                assert not any(s in b.text for s in train_sents if len(s) > 30)
    assert fonts <= set(cfg.heldout_fonts) and "stix" in fonts
    assert make_page(0, cfg, seed=0, split="heldout").grounding != make_page(0, cfg, seed=0).grounding


def test_easy_profile():
    cfg = SynthConfig.easy()
    vocab = set(load_corpus("train").vocab)
    for i in range(6):
        page = make_page(i, cfg, seed=4)
        assert page.size == (512, 512)
        assert 1 <= len(page.blocks) <= 4
        words = re.findall(r"[A-Za-z]+", page.plain_text)
        assert words and {w.lower() for w in words} <= vocab


def test_line_and_word_crops(doc_dir):
    recs = [r for r in _records(doc_dir) if r["task"] in ("line", "word")]
    assert recs
    for r in recs:
        img = Image.open(doc_dir / r["image"])
        assert img.width > img.height > 8
        if r["task"] == "word":
            assert " " not in r["response"]
        assert _dark(img).sum() > 5


def test_block_crops_show_a_paragraph_or_list_whole(doc_dir):
    """A block crop holds every line of one paragraph or list and nothing of the blocks around it,
    and its answer is the block's text as the page's free answer has it."""
    recs = [r for r in _records(doc_dir) if r["task"] == "block"]
    assert recs
    pages = {}
    for r in recs:
        if r["page"] not in pages:
            split, seed, index = r["page"].split("-")
            pages[r["page"]] = make_page(int(index), SynthConfig.document(tasks=ALL_TASKS, noise_prob=0.5),
                                         int(seed[1:]), split)
        page = pages[r["page"]]
        k = int(r["id"].rsplit("block", 1)[1])
        piece = block_pieces(page)[k]
        assert r["response"] == piece.text and r["response"] in page.plain_text.split("\n\n")
        x1, y1, x2, y2 = piece_crop_box(page.size, piece)
        assert x1 == max(0, piece.box_px[0] - max(2, piece.line_px // 4))  # a line's side padding, not a block's
        lines = [p.text for p in page.lines
                 if x1 <= (p.box_px[0] + p.box_px[2]) / 2 <= x2 and y1 <= (p.box_px[1] + p.box_px[3]) / 2 <= y2]
        said = " ".join(r["response"].split())
        assert len(lines) >= 2 and all(" ".join(t.split()) in said for t in lines)  # its lines, and only its own
        assert sum(len(t.split()) for t in lines) == len(said.split())
        assert Image.open(doc_dir / r["image"]).size == (x2 - x1, y2 - y1)
    answers = {r["response"] for r in recs}
    assert {b.label for p in pages.values() for b in p.blocks if b.text in answers} <= {"text", "list"}


def test_crop_files_at_page_scale_are_the_page_with_only_that_piece(tmp_path):
    cfg = SynthConfig.document(tasks=("line",), noise_prob=0.0)
    crop_dir, page_dir = generate(tmp_path / "crop", 2, cfg, seed=3).parent, tmp_path / "page"
    generate(page_dir, 2, SynthConfig.document(tasks=("line",), noise_prob=0.0, crop_scale="page"), seed=3)
    crops, on_page = _records(crop_dir), _records(page_dir)
    assert [r["id"] for r in crops] == [r["id"] for r in on_page] and crops
    for crop_rec, page_rec in zip(crops, on_page):
        assert crop_rec["response"] == page_rec["response"]
        page = Image.open(page_dir / f"images/{page_rec['page']}.png").convert("L")
        shown = Image.open(page_dir / page_rec["image"]).convert("L")
        crop = np.asarray(Image.open(crop_dir / crop_rec["image"]).convert("L"))
        assert shown.size == page.size  # the page's size, so its text keeps the page's size in the view
        ink = np.argwhere(np.asarray(shown) < 128)
        (y1, x1), (y2, x2) = ink.min(0), ink.max(0) + 1
        assert y2 - y1 <= crop.shape[0] and x2 - x1 <= crop.shape[1]  # only the piece's ink
        assert np.array_equal(np.asarray(page)[y1:y2, x1:x2], np.asarray(shown)[y1:y2, x1:x2])  # where it was
    with pytest.raises(ValueError, match="crop_scale"):
        generate(tmp_path / "bad", 1, SynthConfig.document(crop_scale="view"))


def test_zoomed_crop_files_hold_the_crop_on_a_canvas_between_crop_and_page(tmp_path):
    cfg = SynthConfig.document(tasks=("line",), noise_prob=0.0)
    crop_dir = generate(tmp_path / "crop", 2, cfg, seed=3).parent
    zoom_dir = generate(tmp_path / "zoom", 2, replace(cfg, crop_scale="zoom"), seed=3).parent
    crops, zoomed = _records(crop_dir), _records(zoom_dir)
    assert [(r["id"], r["response"]) for r in crops] == [(r["id"], r["response"]) for r in zoomed] and crops
    sizes = set()
    for crop_rec, zoom_rec in zip(crops, zoomed):
        page = Image.open(zoom_dir / f"images/{zoom_rec['page']}.png")
        crop = np.asarray(Image.open(crop_dir / crop_rec["image"]).convert("L"))
        shown = np.asarray(Image.open(zoom_dir / zoom_rec["image"]).convert("L"))
        assert max(crop.shape) <= max(shown.shape) <= max(page.size)
        ink = np.argwhere(shown < 128)
        (y1, x1), (y2, x2) = ink.min(0), ink.max(0) + 1
        assert y2 - y1 <= crop.shape[0] and x2 - x1 <= crop.shape[1]  # only the piece's ink
        sizes.add(shown.shape)
    assert len(sizes) > 1


def test_ten_pages_are_fast(tmp_path):
    cfg = SynthConfig.document()
    make_page(0, cfg, seed=0)  # fonts and corpus loaded once
    t = time.process_time()
    generate(tmp_path, 10, cfg, seed=99)
    assert time.process_time() - t < 3.0


def test_font_fallback_warns(monkeypatch):
    synth.get_font.cache_clear()
    monkeypatch.setattr(synth, "font_dir", lambda: None)
    try:
        with pytest.warns(UserWarning, match="default font"):
            page = make_page(0, SynthConfig.easy(), seed=0)
        assert page.blocks
    finally:
        synth.get_font.cache_clear()


def test_text_records():
    a = text_records(20, seed=1)
    assert a == text_records(20, seed=1)
    assert len({r["id"] for r in a}) == 20
    for r in a:
        assert r["task"] == "text"
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(m["content"] for m in r["messages"])
    held = text_records(20, seed=1, split="heldout")
    assert {r["messages"][0]["content"] for r in held}.isdisjoint({r["messages"][0]["content"] for r in a})


def test_config_errors():
    with pytest.raises(ValueError, match="unknown tasks"):
        generate("/nonexistent", 1, SynthConfig(tasks=("markdown", "nope")))
    with pytest.raises(ValueError, match="unknown split"):
        make_page(0, SynthConfig(), split="test")
    with pytest.raises(ValueError, match="block_weights"):
        make_page(0, SynthConfig(block_weights={"figure": 1.0}))
    with pytest.raises(ValueError, match="profile"):
        SynthConfig.from_profile("huge")


def test_cli(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path), "--pages", "2", "--profile", "easy", "--split", "heldout",
                       "--tasks", "markdown,lines", "--text-records", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    recs = _records(tmp_path)
    assert summary["records"] == len(recs) and {r["task"] for r in recs} == {"markdown", "line"}
    assert all(r["split"] == "heldout" for r in recs)
    assert len((tmp_path / "text.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path), "--tasks", "bogus"])
