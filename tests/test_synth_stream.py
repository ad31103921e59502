"""The tier-2 data path: the `reading` page profile, the Ray Data stream of rendered pages,
and a stage-1 run on that stream that stops at its time limit and resumes (real Ray Train,
MLflow on SQLite, tiny preset on CPU)."""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from model.processor import ImageProcessor
from model.tokenizer import Tokenizer
from pipeline.synth import SynthConfig, load_corpus, make_page, pseudo_word
from pipeline.synth_stream import (SynthStreamConfig, render_crops, render_piece_sample, render_record,
                                   render_sample, stream_texts, synth_dataset)
from pipeline.train import PENDING_RUN_FILE, load_train_config, run_stage

TINY_STREAM = dict(profile="reading", pages=48, seed=3, mode="tiny", pages_per_task=8,
                   overrides={"width_range": [480, 520]})


def _sentences(page) -> list[str]:
    """The sentences of a page's paragraphs."""
    return [s.strip() for b in page.blocks if b.label == "text"
            for s in re.split(r"(?<=[.!?])\s+", b.text.replace("\n", " ")) if s.strip()]


def test_reading_profile_holds_out_fonts_and_sentences():
    cfg = SynthConfig.reading()
    train_fonts = {make_page(i, cfg, 0, "train").font_family for i in range(12)}
    assert train_fonts <= set(cfg.train_fonts) and len(train_fonts) > 1
    heldout = [make_page(i, cfg, 1, "heldout") for i in range(6)]
    assert {p.font_family for p in heldout} == {"stix"}
    train_lines = set(load_corpus("train").sentences)
    held_sentences = [s for p in heldout for s in _sentences(p)]
    assert held_sentences, "held-out pages should carry corpus sentences"
    assert not train_lines.intersection(held_sentences)
    held_lines = load_corpus("heldout").sentences
    for sentence in held_sentences:  # the last one on a full page may be cut short
        assert any(line.startswith(sentence) for line in held_lines), sentence


def test_reading_profile_trains_on_word_salad():
    cfg = SynthConfig.reading()
    corpus = set(load_corpus("train").sentences)
    sentences = [s for i in range(10) for s in _sentences(make_page(i, cfg, 0, "train"))]
    salad = [s for s in sentences if s not in corpus]
    assert len(salad) > len(sentences) // 2  # mostly random words, so remembering sentences does not pay


def test_pseudo_words_are_new_words_made_of_letters():
    import random

    words = load_corpus("train").words
    drawn = [pseudo_word(words, random.Random(7)) for _ in range(3)]
    assert drawn == [pseudo_word(words, random.Random(7)) for _ in range(3)]  # the generator decides
    rng = random.Random(0)
    many = [pseudo_word(words, rng) for _ in range(300)]
    assert all(w.isalpha() and w.islower() and 2 <= len(w) <= 12 for w in many)
    assert sum(w not in set(words) for w in many) >= 290  # new words, not the list's
    assert len(set(many)) > 200
    with pytest.raises(ValueError, match="non-empty"):
        pseudo_word((), rng)


def _page_words(page) -> set[str]:
    """Words of four letters or more (salad's codes such as 'DKN-12' are shorter)."""
    return {w.lower() for b in page.blocks if b.label in ("text", "list", "title")
            for w in re.findall(r"[A-Za-z]{4,}", b.text)}


def test_pseudo_word_prob_changes_the_training_text_and_not_the_heldout_pages():
    plain, pseudo = SynthConfig.reading(), SynthConfig.reading(pseudo_word_prob=1.0)
    known = set(load_corpus("train").words)
    plain_new = set().union(*(_page_words(make_page(i, plain, 0, "train")) for i in range(6))) - known
    pseudo_words = set().union(*(_page_words(make_page(i, pseudo, 0, "train")) for i in range(6)))
    assert not plain_new  # word salad draws the split's own words
    assert len(pseudo_words - known) > len(pseudo_words) // 2
    for i in range(3):  # held-out text never comes from salad: the evaluation pages stay the same
        assert make_page(i, pseudo, 1, "heldout").image.tobytes() == make_page(i, plain, 1, "heldout").image.tobytes()
    with pytest.raises(ValueError, match="pseudo_word_prob"):
        SynthConfig.reading(pseudo_word_prob=1.5).validate()


def test_train_line_spacing_moves_training_lines_apart_and_leaves_heldout_pages():
    plain, spaced = SynthConfig.reading(), SynthConfig.reading(train_line_spacing_range=(2.0, 2.0))

    def pitches(page) -> list[float]:
        """Distances between successive lines of each paragraph, in the paragraph's line heights."""
        out = []
        for block in (b for b in page.blocks if b.label == "text"):
            x1, y1, x2, y2 = block.box_px
            tops = sorted(p.box_px for p in page.lines if y1 <= (p.box_px[1] + p.box_px[3]) / 2 <= y2
                          and x1 <= (p.box_px[0] + p.box_px[2]) / 2 <= x2)
            out += [(b[1] - a[1]) / (a[3] - a[1]) for a, b in zip(tops, tops[1:])]
        return out

    def gaps(page) -> tuple[list[int], list[int]]:
        """(blank pixels between a paragraph's lines, between one block's last line and the next's first)."""
        rows = []
        for block in page.blocks:
            x1, y1, x2, y2 = block.box_px
            rows.append(sorted(p.box_px[1::2] for p in page.lines if y1 <= (p.box_px[1] + p.box_px[3]) / 2 <= y2
                               and x1 <= (p.box_px[0] + p.box_px[2]) / 2 <= x2))
        inside = [b[0] - a[1] for block, lines in zip(page.blocks, rows) if block.label == "text"
                  for a, b in zip(lines, lines[1:])]
        between = [nxt[0][0] - prev[-1][1] for prev, nxt in zip(rows, rows[1:]) if prev and nxt]
        return inside, between

    before = [r for i in range(6) for r in pitches(make_page(i, plain, 0, "train"))]
    after = [r for i in range(6) for r in pitches(make_page(i, spaced, 0, "train"))]
    assert before and after and max(before) < min(after)  # every paragraph's lines farther apart
    for i in range(6):  # and the blocks farther apart still: a wide line gap is not a paragraph's end
        inside, between = gaps(make_page(i, spaced, 0, "train"))
        assert not inside or not between or max(inside) < min(between)
    for i in range(3):  # the evaluation pages stay the same
        assert make_page(i, spaced, 1, "heldout").image.tobytes() == make_page(i, plain, 1, "heldout").image.tobytes()
    with pytest.raises(ValueError, match="train_line_spacing_range"):
        SynthConfig.reading(train_line_spacing_range=(2.0, 1.0)).validate()


def test_stretch_scales_pixels_not_relative_boxes():
    plain = make_page(5, SynthConfig.reading(stretch_range=(1.0, 1.0)), 0, "train")
    wide = make_page(5, SynthConfig.reading(stretch_range=(1.25, 1.25)), 0, "train")
    assert wide.image.height == plain.image.height
    assert wide.image.width == round(plain.image.width * 1.25)
    assert [b.box for b in wide.blocks] == [b.box for b in plain.blocks]
    assert wide.plain_text == plain.plain_text
    for a, b in zip(plain.blocks, wide.blocks):
        assert b.box_px[2] >= a.box_px[2] * 1.2


@pytest.mark.parametrize("bad, match", [
    (dict(tasks={"figure": 1.0}), "synth.tasks"),
    (dict(tasks={"free": 0.0}), "synth.tasks"),
    (dict(overrides={"no_such_field": 1}), "unknown synth.overrides"),
    (dict(overrides={"seed": 1}), "synth.overrides may not set \\['seed'\\]"),  # the stream's own seed
    (dict(pages=0), "pages"),
    (dict(mode="huge"), "unknown mode"),
    (dict(profile="comic"), "unknown synth profile"),
    (dict(crop_scale="view"), "synth.crop_scale"),
])
def test_stream_config_errors_are_clear(bad, match):
    with pytest.raises(ValueError, match=match):
        SynthStreamConfig(**{**TINY_STREAM, **bad})


def test_stream_crop_tasks_show_one_line_or_word_of_the_page():
    stream = SynthStreamConfig(**{**TINY_STREAM, "tasks": {"line": 1.0, "word": 1.0}})
    tasks = set()
    for index in range(8):
        image, rec = render_record(index, stream)
        page = make_page(index, stream.synth_config(), stream.seed, "train")
        pieces = page.lines if rec["task"] == "line" else page.words
        assert rec["prompt"] == "<image>\nFree OCR." and rec["response"] in [p.text for p in pieces]
        assert any(ch.isalnum() for ch in rec["response"])
        assert image.width < page.size[0] and image.height < page.size[1] // 4  # a crop, not the page
        tasks.add(rec["task"])
    assert tasks == {"line", "word"}


def test_stream_block_task_shows_one_paragraph_or_list_of_the_page():
    stream = SynthStreamConfig(**{**TINY_STREAM, "tasks": {"block": 1.0}, "crop_scale": "zoom"})
    blocks = 0
    for index in range(8):
        page, piece, image, rec = render_piece_sample(index, stream)
        if piece is None:  # a page with no paragraph or list of two lines is read whole
            assert rec["task"] == "free" and image is page.image
            continue
        blocks += 1
        assert rec["task"] == "block" and rec["prompt"] == "<image>\nFree OCR."
        assert rec["response"] == piece.text and rec["response"] in page.plain_text.split("\n\n")
        assert piece.box_px[3] - piece.box_px[1] > 1.5 * piece.line_px  # more than one line
        x1, y1, x2, y2 = piece.box_px
        assert x2 - x1 <= image.width <= page.size[0] and y2 - y1 <= image.height <= page.size[1]
    assert blocks >= 4


def test_page_scale_crops_keep_the_pages_text_size_and_place():
    """crop_scale "page": the line alone on a page-sized canvas, its glyphs where the page has them;
    "crop" shows the same line larger in the view."""
    from pipeline.glyphs import page_glyphs
    from pipeline.synth import piece_crop_box
    from pipeline.synth_stream import sample_glyphs

    on_page = SynthStreamConfig(**{**TINY_STREAM, "tasks": {"line": 1.0}, "crop_scale": "page"})
    cropped = SynthStreamConfig(**{**TINY_STREAM, "tasks": {"line": 1.0}})
    ratios = []
    for index in range(4):
        page, piece, image, rec = render_piece_sample(index, on_page)
        assert image.size == page.size and rec["response"] == piece.text
        x1, y1, x2, y2 = piece_crop_box(page.size, piece)
        pixels, original = np.asarray(image), np.asarray(page.image)
        assert np.array_equal(pixels[y1:y2, x1:x2], original[y1:y2, x1:x2])  # the line, where it was
        outside = pixels.copy()
        outside[y1:y2, x1:x2] = pixels[0, 0]
        assert (outside == pixels[0, 0]).all()  # nothing else: one paper colour
        assert abs(int(pixels[0, 0, 0]) - int(np.median(original[:4, :, 0]))) <= 1

        view = 1024
        shown = sample_glyphs(page, piece, "line", view, "page")
        everywhere = {tuple(g) for g in page_glyphs(page, view).tolist()}
        assert len(shown) and all(tuple(g) in everywhere for g in shown.tolist())  # the page's own glyph rows
        _, same_piece, crop, _ = render_piece_sample(index, cropped)
        assert same_piece == piece and crop.size[0] < page.size[0]
        larger = sample_glyphs(page, piece, "line", view, "crop")
        ratios.append(float(np.median(larger[:, 3] - larger[:, 2]) / np.median(shown[:, 3] - shown[:, 2])))
    assert min(ratios) >= 0.99 and max(ratios) > 1.3, ratios  # a line as wide as the page: the same size


def test_zoomed_crops_show_a_line_between_the_pages_text_size_and_the_crops():
    """crop_scale "zoom": the line alone on an empty canvas at a size drawn between the page's
    (canvas = page) and its own crop's (canvas = crop), the same every time it is drawn; its
    glyphs are where the canvas has it."""
    from pipeline.synth import piece_crop, piece_layout
    from pipeline.synth_stream import sample_glyphs

    zoom = SynthStreamConfig(**{**TINY_STREAM, "tasks": {"line": 1.0}, "crop_scale": "zoom"})
    view, zooms = 1024, []
    for index in range(12):
        page, piece, image, rec = render_piece_sample(index, zoom)
        assert rec["response"] == piece.text
        crop = np.asarray(piece_crop(page.image, piece))
        size, (ox, oy) = piece_layout(page.size, piece, "zoom", page.page_id)
        assert image.size == size and max(crop.shape[:2]) <= max(size) <= max(page.size)
        pixels = np.asarray(image)
        h, w = crop.shape[:2]
        assert np.array_equal(pixels[oy:oy + h, ox:ox + w], crop)  # the line, unscaled, at the drawn place
        paper = np.median(np.asarray(page.image)[:4].reshape(-1, pixels.shape[2]), axis=0).astype(pixels.dtype)
        outside = pixels.copy()
        outside[oy:oy + h, ox:ox + w] = paper
        assert (outside == paper).all()  # nothing else: the paper's colour
        assert np.array_equal(np.asarray(render_piece_sample(index, zoom)[2]), pixels)  # drawn alike each time

        shown = sample_glyphs(page, piece, "line", view, "zoom")
        alone = sample_glyphs(page, piece, "line", view, "crop")
        on_page = sample_glyphs(page, piece, "line", view, "page")
        # the crop's glyphs, moved to (ox, oy) on the canvas (each view pads its image to a centred square)
        x_px = alone[:, 1] * max(w, h) / view - (max(w, h) - w) / 2
        top_px = alone[:, 2] * max(w, h) / view - (max(w, h) - h) / 2
        m = max(size)
        np.testing.assert_allclose(shown[:, 1], (x_px + ox + (m - size[0]) / 2) * view / m, atol=0.05)
        np.testing.assert_allclose(shown[:, 2], (top_px + oy + (m - size[1]) / 2) * view / m, atol=0.05)
        np.testing.assert_array_equal(shown[:, 0], alone[:, 0])
        z = max(page.size) / m  # how much larger than on the page the view shows the line
        height = lambda g: float(np.median(g[:, 3] - g[:, 2]))  # noqa: E731
        assert height(shown) == pytest.approx(z * height(on_page), rel=0.01)
        assert height(on_page) * 0.99 <= height(shown) <= height(alone) * 1.01
        zooms.append(z)
    assert min(zooms) < 1.3 and max(zooms) > 2.0 and len(set(zooms)) == len(zooms), zooms  # many sizes


def test_render_crops_renders_a_page_once_for_all_its_crops():
    stream = SynthStreamConfig(**{**TINY_STREAM, "tasks": {"line": 1.0, "word": 1.0, "free": 1.0}})
    kinds = set()
    for index in range(9):
        _, image, rec = render_sample(index, stream)
        page, crops = render_crops(index, stream)
        records = [r for _, r in crops]
        assert rec in records  # the stream's one sample of the page is among them
        kinds.add(rec["task"])
        if rec["task"] in ("line", "word"):
            assert len({r["id"] for r in records}) == len(records) > 1  # distinct crops
            _, few = render_crops(index, stream, limit=1)
            assert len(few) == 1 and few[0][1] in records
        else:
            assert len(crops) == 1 and crops[0][0].size == page.size  # a page task: the page itself
    assert {"line", "word", "free"} <= kinds


def test_stream_for_resume_draws_other_pages():
    stream = SynthStreamConfig(**TINY_STREAM)
    assert stream.for_resume(0) == stream
    resumed = stream.for_resume(40)
    assert resumed.seed != stream.seed
    assert render_record(0, resumed)[1]["response"] != render_record(0, stream)[1]["response"]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    Tokenizer.train(stream_texts(SynthStreamConfig(**TINY_STREAM), 12), 512).save(path)
    return path / "tokenizer.json"


def test_stream_render_tasks_caps_the_render_pool_and_keeps_the_rows(ray_local, tokenizer_file):
    stream = SynthStreamConfig(**{**TINY_STREAM, "pages": 6, "pages_per_task": 2, "tasks": {"free": 1.0}})
    capped = dataclasses.replace(stream, render_tasks=1)
    assert synth_dataset(stream, tokenizer_file.read_text(), 1024)._logical_plan.dag.compute.size is None
    ds = synth_dataset(capped, tokenizer_file.read_text(), 1024)
    assert ds._logical_plan.dag.compute.size == 1  # what Ray Data's executor schedules by
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    free = sorted(synth_dataset(stream, tokenizer_file.read_text(), 1024).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [r["id"] for r in free] and len(rows) == 6
    assert all(list(a["input_ids"]) == list(b["input_ids"]) for a, b in zip(rows, free))
    with pytest.raises(ValueError, match="render_tasks must be >= 1"):
        dataclasses.replace(stream, render_tasks=0)


def test_stream_rows_are_shard_rows(ray_local, tokenizer_file):
    from pipeline.preprocess import decode_row

    stream = SynthStreamConfig(**{**TINY_STREAM, "pages": 10, "tasks": {"free": 1.0}})
    rows = synth_dataset(stream, tokenizer_file.read_text(), 1024).take_all()
    assert len(rows) == 10
    tokenizer = Tokenizer.load(tokenizer_file)
    processor = ImageProcessor.from_mode("tiny")
    for i, row in enumerate(sorted(rows, key=lambda r: r["id"])):
        image, record = render_record(i, stream)
        r = decode_row(row)
        assert r["task"] == record["task"] == "free"
        assert r["global_view"].shape == (512, 512, 3)
        expected = processor.process(image)
        assert r["n_image_tokens"] == expected.n_image_tokens
        np.testing.assert_array_equal(r["global_view"], expected.global_view)
        ids, mask = tokenizer.render_vision(record["prompt"], record["response"], expected.n_image_tokens)
        assert list(r["input_ids"]) == list(ids) and list(r["loss_mask"]) == list(mask)


@pytest.mark.parametrize("crop_scale", ["crop", "page", "zoom"])
def test_stream_rows_carry_glyphs_of_the_view_they_show(ray_local, tokenizer_file, crop_scale):
    from pipeline.glyphs import char_class
    from pipeline.synth_stream import GLYPHS_COLUMN, sample_glyphs
    from pipeline.train import row_to_sample

    stream = SynthStreamConfig(**{**TINY_STREAM, "pages": 8, "tasks": {"free": 1.0, "line": 1.0},
                                  "crop_scale": crop_scale})
    rows = synth_dataset(stream, tokenizer_file.read_text(), 1024, glyphs=True).take_all()
    assert len(rows) == 8
    assert GLYPHS_COLUMN not in synth_dataset(stream, tokenizer_file.read_text(), 1024).take(1)[0]
    tasks = set()
    for i, row in enumerate(sorted(rows, key=lambda r: r["id"])):
        page, _, record = render_sample(i, stream)
        sample = row_to_sample(row)
        if record["task"] == "line":  # the glyphs of the line as this crop_scale shows it
            _, piece, _, _ = render_piece_sample(i, stream)
            assert np.allclose(sample.glyphs, sample_glyphs(page, piece, "line", 512, crop_scale), atol=0.01)
        tasks.add(record["task"])
        text = (record["response"].removeprefix("• ") if record["task"] == "line"  # a bullet is not a word
                else "".join(w.text for w in page.words))
        chars = [c for c in text if not c.isspace()]
        assert sample.glyphs.shape == (len(chars), 4)
        assert sorted(sample.glyphs[:, 0].astype(int).tolist()) == sorted(char_class(c) for c in chars)
        assert (sample.glyphs[:, 1:] >= -1).all() and (sample.glyphs[:, 1:] <= 513).all()  # inside the 512 px view
    assert tasks == {"free", "line"}


@pytest.mark.parametrize("bad, match", [
    (dict(glyph_loss=-1.0), "glyph_loss must be >= 0"),
    (dict(glyph_loss=1.0, synth=None), "synth stream"),
    (dict(glyph_loss=1.0, synth={**TINY_STREAM, "mode": "gundam"}), "has tiles"),
    (dict(glyph_loss=1.0, compile=True), "use compile_vision"),
    (dict(glyph_loss=1.0, strategy="fsdp", num_workers=2), "use strategy ddp"),
])
def test_glyph_loss_config_errors_are_clear(bad, match):
    with pytest.raises(ValueError, match=match):
        load_train_config(None, **{"stage": 1, "synth": dict(TINY_STREAM), **bad})


@pytest.mark.slow
def test_stage1_on_stream_with_glyph_loss_stops_at_time_limit_and_resumes(ray_local, tokenizer_file, tmp_path,
                                                                          mlflow_uri):
    """Two DDP workers on the stream with the glyph heads: a time-limited first call checkpoints
    (heads beside the weights) and a second call resumes the same MLflow run to the end."""
    from safetensors import safe_open

    from model.weights import load_checkpoint, load_optimizer_state
    from pipeline.glyph_loss import STATE_FILE

    base = dict(stage=1, preset="tiny", synth=dict(TINY_STREAM), tokenizer=str(tokenizer_file),
                out=str(tmp_path / "runs"), run_name="glyphs", tracking_uri=mlflow_uri, experiment="test-glyphs",
                seq_len=1024, batch_size=2, steps=3, warmup_steps=1, log_every=1, sample_prediction=False,
                glyph_loss=1.0, slot_centering=True, projector_input_norm=True, num_workers=2,
                skip_spikes=100.0)
    first = run_stage(load_train_config(None, **base, time_limit_s=0.0))  # stops at step 1 with a checkpoint
    assert not first.complete
    assert first.metrics["step"] == 1 and first.metrics["stopped_at_time_limit"] == 1.0
    assert (Path(first.checkpoint_dir) / STATE_FILE).is_file()
    guard = load_optimizer_state(first.checkpoint_dir)["spike_guard"]  # the resumed run keeps its bar
    assert guard["seen"] and guard["reference"] > 0 and guard["skipped"] == 0 and guard["in_a_row"] == 0
    pending = tmp_path / "runs" / "glyphs" / PENDING_RUN_FILE
    assert pending.is_file()
    assert not (tmp_path / "runs" / "glyphs" / "final").exists()
    client = MlflowClient(mlflow_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    ray_copies = lambda: set(Path(tempfile.gettempdir()).glob("checkpoint_tmp_*"))  # noqa: E731
    before = ray_copies()
    second = run_stage(load_train_config(None, **base))  # resumes with the heads' weights
    assert second.complete and second.run_id == first.run_id and second.metrics["step"] == 3
    assert ray_copies() <= before  # the resume read the checkpoint in place: no copy left in /tmp
    assert not pending.exists()
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.params["mode"] == "tiny"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2, 3]
    final = Path(second.checkpoint_dir)
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("glyph_heads") for k in f.keys())
    with safe_open(str(final / STATE_FILE), "pt") as f:
        assert {"cell.weight", "cell.bias", "patch.weight", "patch.bias"} <= set(f.keys())
    model, _, _ = load_checkpoint(str(final), with_tokenizer=False)  # the plain model loads strictly
    assert not hasattr(model, "glyph_heads") and model.config.slot_centering and model.config.projector_input_norm
    for name in ("glyph_cell_loss", "glyph_patch_loss", "glyph_patch_error", "slot_rms_mean", "slot_rms_min",
                 "projector_input_absmax", "skipped_steps"):
        history = client.get_metric_history(second.run_id, name)
        assert [m.step for m in history] == [1, 2, 3] and all(np.isfinite(m.value) for m in history)
    assert 0 < second.metrics["glyph_patch_loss"] < 20
    assert second.metrics["skipped_steps"] == 0  # no spike in three steps of a tiny model at 100x
    assert 0 < second.metrics["slot_rms_min"] <= second.metrics["slot_rms_mean"]


def test_stream_gives_several_crops_of_a_line_page(ray_local, tokenizer_file):
    from pipeline.synth_stream import GLYPHS_COLUMN
    from pipeline.train import row_to_sample

    stream = SynthStreamConfig(**{**TINY_STREAM, "pages": 8, "tasks": {"line": 1.0}, "crops_per_page": 3})
    rows = synth_dataset(stream, tokenizer_file.read_text(), 1024, glyphs=True).take_all()
    expected = {rec["id"]: rec for i in range(8) for _, rec in render_crops(i, stream, limit=3)[1]}
    assert 8 < len(rows) <= 24 and {r["id"] for r in rows} == set(expected)
    pages = [r["id"].rsplit("-line", 1)[0] for r in rows]
    assert pages != sorted(pages)  # one page's crops are spread over the block, not in a run
    for row in rows:
        sample = row_to_sample(row)
        text = expected[row["id"]]["response"].removeprefix("• ")  # a list's bullet is drawn, but not a word
        assert len(sample.glyphs) == sum(not c.isspace() for c in text)
    assert GLYPHS_COLUMN in rows[0]
    with pytest.raises(ValueError, match="crops_per_page"):
        SynthStreamConfig(**{**TINY_STREAM, "crops_per_page": 0})
