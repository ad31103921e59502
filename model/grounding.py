"""DeepSeek-OCR grounding output: parse, draw, crop, and turn into markdown.

The model marks layout blocks as ``<|ref|>label<|/ref|><|det|>[[x1,y1,x2,y2],...]<|/det|>``
followed by the block's content. Coordinates are integers 0..999 of the *original* image;
pixels are ``int(v / 999 * W)`` for x and ``int(v / 999 * H)`` for y (the reference's rule).

Model output is untrusted text: everything here tolerates truncation and garbage. Problems
never raise; they become entries in ``GroundingResult.warnings`` and whatever could be read
is kept. Pure PIL/numpy; no Ray or MLflow.
"""

from __future__ import annotations

import colorsys
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
COORD_MAX = 999

# End-of-sequence spellings that can leak into decoded text (DeepSeek's full-width one included).
STRAY_TOKENS = ("<｜end▁of▁sentence｜>", "<|end▁of▁sentence|>", "<|endoftext|>", "<|assistant_end|>")
# LaTeX macros the reference rewrites to plain symbols in its markdown.
LATEX_FIXES = (("\\coloneqq", ":="), ("\\eqqcolon", "=:"))

# One grounding span: a ref (closed or not) optionally followed by a det, or a det alone.
_SPAN_RE = re.compile(
    r"<\|ref\|>(?P<label>.*?)(?:<\|/ref\|>|(?=<\|ref\|>|<\|det\|>|\n|$))"
    r"(?:[ \t]*<\|det\|>(?P<det>.*?)(?P<det_end><\|/det\|>|(?=<\|ref\|>|\n)|$))?"
    r"|<\|det\|>(?P<det_only>.*?)(?P<det_only_end><\|/det\|>|(?=<\|ref\|>|\n)|$)",
    re.DOTALL,
)
_GROUP_RE = re.compile(r"\[([^\[\]]*)(\]?)")


@dataclass
class Box:
    """One detected region. ``box`` is in 0..999 units; ``box_px`` once the image size is known."""

    label: str
    box: tuple[int, int, int, int]
    box_px: tuple[int, int, int, int] | None = None
    ref_index: int = 0  # which <|ref|> span it came from (a ref may carry several boxes)

    def to_pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Pixel corners in an image of ``width`` x ``height`` (reference rounding: truncate)."""
        x1, y1, x2, y2 = self.box
        return (
            int(x1 / COORD_MAX * width),
            int(y1 / COORD_MAX * height),
            int(x2 / COORD_MAX * width),
            int(y2 / COORD_MAX * height),
        )

    def with_pixels(self, width: int, height: int) -> "Box":
        return replace(self, box_px=self.to_pixels(width, height))

    def as_dict(self) -> dict:
        d = {"label": self.label, "box": list(self.box)}
        if self.box_px is not None:
            d["box_px"] = list(self.box_px)
        return d


@dataclass
class GroundingResult:
    """Everything parsed from one model output."""

    boxes: list[Box] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_pixels(self, width: int, height: int) -> "GroundingResult":
        return GroundingResult([b.with_pixels(width, height) for b in self.boxes], list(self.warnings))

    @property
    def labels(self) -> list[str]:
        return [b.label for b in self.boxes]


@dataclass
class _Span:
    start: int
    end: int
    label: str | None  # None: a det with no ref
    boxes: list[tuple[int, int, int, int]]


def _parse_number(raw: str) -> float | None:
    try:
        v = float(raw.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _parse_det(det: str, closed_det: bool, where: str, warnings: list[str]) -> list[tuple[int, int, int, int]]:
    """Boxes from the inside of a det tag; bad groups are dropped with a warning, never raised.

    An unclosed ``[..`` is kept when the det tag itself was closed (the numbers are complete)
    and dropped when the output was cut off (its last number may be cut too).
    """
    boxes: list[tuple[int, int, int, int]] = []
    groups = _GROUP_RE.findall(det)
    if not groups:
        if det.strip():
            warnings.append(f"{where}: no [x1,y1,x2,y2] list in det {det.strip()[:40]!r}")
        else:
            warnings.append(f"{where}: empty det")
        return boxes
    for inner, closed in groups:
        if not inner.strip():
            continue  # the outer '[' of '[[...]]' or an empty list
        parts = [p for p in inner.split(",")]
        if parts and not parts[-1].strip() and not closed:
            parts = parts[:-1]
        values = [_parse_number(p) for p in parts]
        if any(v is None for v in values):
            warnings.append(f"{where}: non-numeric coordinates [{inner.strip()[:40]}] dropped")
            continue
        if len(values) < 4:
            warnings.append(f"{where}: truncated box [{inner.strip()}] ({len(values)} of 4 values) dropped")
            continue
        if len(values) > 4:
            warnings.append(f"{where}: box has {len(values)} values; kept the first 4")
            values = values[:4]
        if not closed:
            if not closed_det:
                warnings.append(f"{where}: truncated box [{inner.strip()}] dropped")
                continue
            warnings.append(f"{where}: unclosed box list [{inner.strip()}]")
        coords = []
        for v in values:
            iv = int(round(v))
            if iv < 0 or iv > COORD_MAX:
                warnings.append(f"{where}: coordinate {v:g} outside 0..{COORD_MAX}, clamped")
                iv = min(max(iv, 0), COORD_MAX)
            coords.append(iv)
        x1, y1, x2, y2 = coords
        if x2 < x1:
            warnings.append(f"{where}: x2 < x1 ({x2} < {x1}), swapped")
            x1, x2 = x2, x1
        if y2 < y1:
            warnings.append(f"{where}: y2 < y1 ({y2} < {y1}), swapped")
            y1, y2 = y2, y1
        boxes.append((x1, y1, x2, y2))
    return boxes


def _scan(text: str, warnings: list[str]) -> list[_Span]:
    spans: list[_Span] = []
    for n, m in enumerate(_SPAN_RE.finditer(text)):
        where = f"block {n}"
        if m.group("det_only") is not None:
            warnings.append(f"{where}: <|det|> without a preceding <|ref|>; label set to ''")
            if not m.group("det_only_end"):
                warnings.append(f"{where}: unclosed <|det|>")
            closed = bool(m.group("det_only_end"))
            spans.append(_Span(m.start(), m.end(), None, _parse_det(m.group("det_only"), closed, where, warnings)))
            continue
        label = (m.group("label") or "").strip()
        if not text.startswith(REF_CLOSE, m.end("label")):
            warnings.append(f"{where}: unclosed <|ref|> (label {label[:30]!r})")
        if m.group("det") is None:
            warnings.append(f"{where}: <|ref|>{label[:30]}<|/ref|> has no <|det|> boxes")
            spans.append(_Span(m.start(), m.end(), label, []))
            continue
        closed = bool(m.group("det_end"))
        if not closed:
            warnings.append(f"{where}: unclosed <|det|>")
        spans.append(_Span(m.start(), m.end(), label, _parse_det(m.group("det"), closed, where, warnings)))
    return spans


def parse_grounding(text: str) -> GroundingResult:
    """Boxes and warnings from a model output; never raises on malformed text."""
    warnings: list[str] = []
    if not isinstance(text, str):
        return GroundingResult([], [f"expected text, got {type(text).__name__}"])
    boxes: list[Box] = []
    pos = 0
    stray = 0
    for i, span in enumerate(_scan(text, warnings)):
        stray += text.count(REF_CLOSE, pos, span.start) + text.count(DET_CLOSE, pos, span.start)
        pos = span.end
        for b in span.boxes:
            boxes.append(Box(label=span.label or "", box=b, ref_index=i))
    stray += text.count(REF_CLOSE, pos) + text.count(DET_CLOSE, pos)
    if stray:
        warnings.append(f"{stray} closing tag(s) without an opening tag ignored")
    return GroundingResult(boxes, warnings)


def format_grounding(label: str, boxes: Sequence[Sequence[int]]) -> str:
    """``<|ref|>label<|/ref|><|det|>[[...]]<|/det|>``: the inverse of ``parse_grounding``."""
    if not boxes:
        raise ValueError(f"format_grounding: no boxes for label {label!r}")
    parts = []
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"format_grounding: box {list(b)} needs 4 values")
        vals = [int(v) for v in b]
        if any(v < 0 or v > COORD_MAX for v in vals):
            raise ValueError(f"format_grounding: box {vals} outside 0..{COORD_MAX}")
        parts.append("[" + ", ".join(str(v) for v in vals) + "]")
    return f"{REF_OPEN}{label}{REF_CLOSE}{DET_OPEN}[{', '.join(parts)}]{DET_CLOSE}"


def to_markdown(text: str, figure_paths: Sequence[str] | None = None) -> str:
    """Clean grounded output into markdown, as the reference's ``result.mmd``.

    Each ``image`` box becomes ``![](images/{i}.jpg)`` (or ``figure_paths[i]``), numbered over
    image boxes in order, the same numbering as ``crop_figures``/``render_result``. All other
    ref/det markup is removed together with the newline right after it, keeping the content.
    """
    for tok in STRAY_TOKENS:
        text = text.replace(tok, "")
    out: list[str] = []
    pos = 0
    fig = 0
    for span in _scan(text, []):
        out.append(text[pos:span.start])
        pos = span.end
        if span.label == "image":
            links = []
            for _ in span.boxes or [None]:
                if figure_paths is not None and fig < len(figure_paths):
                    path = figure_paths[fig]
                else:
                    path = f"images/{fig}.jpg"
                links.append(f"![]({path})")
                fig += 1
            out.append("\n".join(links))
        elif text.startswith("\n", pos):
            pos += 1
    out.append(text[pos:])
    md = "".join(out)
    # Leftover lone closing tags from broken output.
    for tag in (REF_CLOSE, DET_CLOSE, REF_OPEN, DET_OPEN):
        md = md.replace(tag, "")
    for a, b in LATEX_FIXES:
        md = md.replace(a, b)
    md = re.sub(r"\n{3,}", "\n\n", md)
    return md.strip()


# ---------------------------------------------------------------------------------- drawing

_LABEL_COLORS = {
    "title": (214, 39, 40),
    "sub_title": (255, 127, 14),
    "text": (31, 119, 180),
    "list": (44, 160, 44),
    "table": (148, 103, 189),
    "image": (227, 119, 194),
    "image_caption": (140, 86, 75),
    "equation": (23, 190, 207),
}


def label_color(label: str) -> tuple[int, int, int]:
    """A fixed colour per label (deterministic, unlike the reference's random colours)."""
    if label in _LABEL_COLORS:
        return _LABEL_COLORS[label]
    h = sum((i + 1) * ord(c) for i, c in enumerate(label)) % 360
    r, g, b = colorsys.hsv_to_rgb(h / 360, 0.8, 0.75)
    return int(r * 255), int(g * 255), int(b * 255)


def _pixel_boxes(boxes: GroundingResult | Iterable[Box], width: int, height: int) -> list[Box]:
    items = boxes.boxes if isinstance(boxes, GroundingResult) else list(boxes)
    return [b.with_pixels(width, height) for b in items]


def _label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType-backed default font
        return ImageFont.load_default()


def draw_boxes(
    image: Image.Image,
    boxes: GroundingResult | Iterable[Box],
    fill_alpha: int = 40,
    font_size: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with a labelled, semi-transparent rectangle per box."""
    base = image.convert("RGB")
    w, h = base.size
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    fill = ImageDraw.Draw(overlay)
    out = base.copy()
    draw = ImageDraw.Draw(out)
    font = _label_font(font_size or max(10, min(w, h) // 60))
    items = _pixel_boxes(boxes, w, h)
    for b in items:
        x1, y1, x2, y2 = b.box_px
        color = label_color(b.label)
        fill.rectangle([x1, y1, x2, y2], fill=color + (fill_alpha,))
    out.paste(overlay, (0, 0), overlay)
    for b in items:
        x1, y1, x2, y2 = b.box_px
        color = label_color(b.label)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=4 if b.label == "title" else 2)
        if b.label:
            l, t, r, bt = draw.textbbox((0, 0), b.label, font=font)
            tx, ty = x1, max(0, y1 - (bt - t) - 4)
            draw.rectangle([tx, ty, tx + (r - l) + 4, ty + (bt - t) + 4], fill=(255, 255, 255))
            draw.text((tx + 2 - l, ty + 2 - t), b.label, font=font, fill=color)
    return out


def crop_figures(image: Image.Image, boxes: GroundingResult | Iterable[Box]) -> list[Image.Image]:
    """Crops of every ``image`` box, in order (zero-area boxes give a 1-pixel crop so numbering holds)."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    crops = []
    for b in _pixel_boxes(boxes, w, h):
        if b.label != "image":
            continue
        x1, y1, x2, y2 = b.box_px
        x1, y1 = min(x1, w - 1), min(y1, h - 1)
        crops.append(rgb.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))))
    return crops


def render_result(image: Image.Image, raw_text: str, out_dir: str | os.PathLike) -> dict:
    """Write ``result.mmd``, ``result_with_boxes.jpg`` and ``images/{i}.jpg`` like the reference.

    Returns ``{"markdown", "boxes_image", "images"}`` (paths), ``"markdown_text"``, the pixel
    ``"boxes"`` and the parser's ``"warnings"``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    w, h = image.size
    parsed = parse_grounding(raw_text).to_pixels(w, h)
    figure_paths = []
    for i, crop in enumerate(crop_figures(image, parsed)):
        p = out / "images" / f"{i}.jpg"
        crop.save(p, quality=95)
        figure_paths.append(p)
    md = to_markdown(raw_text)
    md_path = out / "result.mmd"
    md_path.write_text(md + "\n", encoding="utf-8")
    boxes_path = out / "result_with_boxes.jpg"
    draw_boxes(image, parsed).save(boxes_path, quality=95)
    return {
        "markdown": md_path,
        "boxes_image": boxes_path,
        "images": figure_paths,
        "markdown_text": md,
        "boxes": parsed.boxes,
        "warnings": parsed.warnings,
    }
