"""Grounding output: parsing (incl. broken model output), markdown, drawing, crops, result files."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from model.grounding import (
    Box,
    crop_figures,
    draw_boxes,
    format_grounding,
    label_color,
    parse_grounding,
    render_result,
    to_markdown,
)

GOOD = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# A Title\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 500, 600]]<|/det|>\n\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 650, 900, 800], [100, 820, 900, 980]]<|/det|>\n"
    "Some body text.\nA second line.\n\n"
    "<|ref|>table<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n<table><tr><td>a</td></tr></table>"
)


def test_parse_valid_output():
    r = parse_grounding(GOOD)
    assert r.warnings == []
    assert r.labels == ["title", "image", "text", "text", "table"]
    assert r.boxes[0].box == (100, 50, 900, 120)
    assert [b.ref_index for b in r.boxes] == [0, 1, 2, 2, 3]


def test_pixels_follow_reference_rule():
    b = Box("text", (0, 100, 999, 998))
    w, h = 640, 480
    assert b.to_pixels(w, h) == (0, int(100 / 999 * h), w, int(998 / 999 * h))
    r = parse_grounding(GOOD).to_pixels(1000, 2000)
    assert r.boxes[0].box_px == (int(100 / 999 * 1000), int(50 / 999 * 2000), int(900 / 999 * 1000), int(120 / 999 * 2000))
    assert all(b.box_px is not None for b in r.boxes)


@pytest.mark.parametrize(
    "text, boxes, warn",
    [
        # truncated mid-list: the incomplete box is dropped
        ("<|ref|>text<|/ref|><|det|>[[10, 20, 30, 40], [50, 6", [("text", (10, 20, 30, 40))], "truncated"),
        # truncated inside the label
        ("<|ref|>tex", [], "unclosed <|ref|>"),
        # non-numeric coordinates: that box dropped, the next kept
        ("<|ref|>text<|/ref|><|det|>[[1, two, 3, 4], [5, 6, 7, 8]]<|/det|>", [("text", (5, 6, 7, 8))], "non-numeric"),
        # out of range: clamped
        ("<|ref|>text<|/ref|><|det|>[[-5, 10, 1500, 20]]<|/det|>", [("text", (0, 10, 999, 20))], "clamped"),
        # x2 < x1 and y2 < y1: swapped
        ("<|ref|>list<|/ref|><|det|>[[500, 600, 100, 200]]<|/det|>", [("list", (100, 200, 500, 600))], "swapped"),
        # too many values: first four kept
        ("<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4, 5]]<|/det|>", [("table", (1, 2, 3, 4))], "kept the first 4"),
        # too few values
        ("<|ref|>table<|/ref|><|det|>[[1, 2, 3]]<|/det|>", [], "truncated"),
        # floats are rounded, nan is not a number
        ("<|ref|>text<|/ref|><|det|>[[1.4, 2.6, 300, 400]]<|/det|>", [("text", (1, 3, 300, 400))], None),
        ("<|ref|>text<|/ref|><|det|>[[nan, 2, 3, 4]]<|/det|>", [], "non-numeric"),
        # ref not closed before det
        ("<|ref|>text<|det|>[[1, 2, 3, 4]]<|/det|>\nHi", [("text", (1, 2, 3, 4))], "unclosed <|ref|>"),
        # det without ref
        ("<|det|>[[1, 2, 3, 4]]<|/det|>", [("", (1, 2, 3, 4))], "without a preceding"),
        # ref without det
        ("<|ref|>text<|/ref|>\nHello", [], "has no <|det|>"),
        # det missing its close, content follows on the next line
        ("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]\nHello", [("text", (1, 2, 3, 4))], "unclosed <|det|>"),
        # single flat list instead of a list of lists
        ("<|ref|>text<|/ref|><|det|>[1, 2, 3, 4]<|/det|>", [("text", (1, 2, 3, 4))], None),
        # empty det and plain garbage
        ("<|ref|>text<|/ref|><|det|><|/det|>", [], "empty det"),
        ("]]]] [[[[ <|/det|> ,,,", [], "closing tag"),
        ("", [], None),
    ],
)
def test_parse_malformed(text, boxes, warn):
    r = parse_grounding(text)
    assert [(b.label, b.box) for b in r.boxes] == boxes
    if warn is None:
        assert r.warnings == []
    else:
        assert any(warn in w for w in r.warnings), r.warnings


def test_parse_non_string_never_raises():
    r = parse_grounding(None)  # type: ignore[arg-type]
    assert r.boxes == [] and r.warnings


def test_every_prefix_yields_a_prefix_of_the_boxes():
    """Cutting the output anywhere (as max_tokens does) never invents or corrupts a box."""
    full = [(b.label, b.box) for b in parse_grounding(GOOD).boxes]
    for cut in range(len(GOOD) + 1):
        got = [(b.label, b.box) for b in parse_grounding(GOOD[:cut]).boxes]
        assert got == full[: len(got)], (cut, GOOD[:cut])


def test_random_garbage_never_raises():
    rng = random.Random(0)
    alphabet = list("[],0123456789 -.abc\n") + ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "image", "1e9"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        r = parse_grounding(s)
        for b in r.boxes:
            x1, y1, x2, y2 = b.box
            assert 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999
        to_markdown(s)


def test_format_grounding_round_trip():
    s = format_grounding("table", [[1, 2, 3, 4], (10, 20, 999, 0 + 999)])
    assert s == "<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4], [10, 20, 999, 999]]<|/det|>"
    r = parse_grounding(s + "\ncontent")
    assert r.warnings == [] and [b.box for b in r.boxes] == [(1, 2, 3, 4), (10, 20, 999, 999)]
    with pytest.raises(ValueError, match="outside"):
        format_grounding("text", [[0, 0, 1000, 5]])
    with pytest.raises(ValueError, match="4 values"):
        format_grounding("text", [[0, 0, 5]])
    with pytest.raises(ValueError, match="no boxes"):
        format_grounding("text", [])


def test_to_markdown_like_reference():
    md = to_markdown(GOOD + "<｜end▁of▁sentence｜>")
    assert md == (
        "# A Title\n\n![](images/0.jpg)\n\nSome body text.\nA second line.\n\n<table><tr><td>a</td></tr></table>"
    )
    assert "<|" not in md
    assert to_markdown(GOOD, figure_paths=["figs/a.png"]).count("![](figs/a.png)") == 1
    assert to_markdown("x \\coloneqq y \\eqqcolon z") == "x := y =: z"
    # content between blocks stays, and a truncated tail disappears
    assert to_markdown("Intro\n<|ref|>text<|/ref|><|det|>[[1,2,3,4]]<|/det|>\nBody\n<|ref|>text<|/ref|><|det|>[[1,2") == (
        "Intro\nBody"
    )


def _page(w: int = 200, h: int = 100) -> Image.Image:
    return Image.new("RGB", (w, h), (255, 255, 255))


def test_draw_boxes_marks_inside_only():
    img = _page()
    boxes = parse_grounding("<|ref|>text<|/ref|><|det|>[[250, 300, 750, 900]]<|/det|>").boxes
    out = draw_boxes(img, boxes)
    assert out.size == img.size and out.mode == "RGB"
    assert np.asarray(img).min() == 255  # the input is untouched
    a = np.asarray(out).astype(int)
    x1, y1, x2, y2 = boxes[0].to_pixels(200, 100)
    inside = a[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5]
    assert (inside != 255).any(axis=-1).all()  # semi-transparent fill everywhere inside
    assert inside.mean() > 200  # ... but light
    assert (a[y2 + 3 :, :] == 255).all() and (a[:, x2 + 3 :] == 255).all()  # nothing outside
    # the outline uses the label's colour
    assert tuple(a[(y1 + y2) // 2, x1]) == label_color("text")


def test_crop_figures_only_images():
    img = Image.fromarray(np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8))
    text = (
        "<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nx\n\n"
        "<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499], [500, 500, 999, 999]]<|/det|>\n\n"
        "<|ref|>image<|/ref|><|det|>[[10, 10, 10, 10]]<|/det|>"
    )
    crops = crop_figures(img, parse_grounding(text))
    assert len(crops) == 3
    assert crops[0].size == (int(499 / 999 * 200), int(499 / 999 * 100))
    assert np.array_equal(np.asarray(crops[0]), np.asarray(img)[: crops[0].height, : crops[0].width])
    assert crops[2].size == (1, 1)  # zero-area box keeps its number


def test_render_result_writes_reference_layout(tmp_path):
    img = _page(300, 300)
    res = render_result(img, GOOD, tmp_path / "out")
    out = tmp_path / "out"
    assert res["markdown"] == out / "result.mmd" and res["markdown"].exists()
    assert res["boxes_image"] == out / "result_with_boxes.jpg"
    assert Image.open(res["boxes_image"]).size == (300, 300)
    assert res["images"] == [out / "images" / "0.jpg"]
    assert Image.open(res["images"][0]).size == (int(500 / 999 * 300) - int(100 / 999 * 300),
                                                   int(600 / 999 * 300) - int(200 / 999 * 300))
    assert "![](images/0.jpg)" in res["markdown"].read_text()
    assert [b.label for b in res["boxes"]] == ["title", "image", "text", "text", "table"]
    assert res["boxes"][0].box_px is not None and res["warnings"] == []
