"""Where each character of a rendered page lands in the model's global view, and the per-cell /
per-patch targets made from that.

Why: a model trained from random init on pages does not learn glyphs from the next-token loss
alone; its vision slots collapse to one direction before the decoder reads anything
(``bench/RESULTS.md``, Tier 2 sessions 6-8). Training-only heads that name the characters under
each 16 px patch of SAM's neck and inside each 64 px slot cell give the encoder a direct signal
(:mod:`pipeline.glyph_loss`). The synthetic stream knows every word's box, so it can say which
character lies where; this module turns those boxes into view coordinates and targets.

A glyph is one row of a float32 ``[n, 4]`` array: (character class, x centre, top, bottom) in
pixels of the square global view (the page padded to a centred square and resized, as the
processor does). A word's characters share its box evenly: the boxes are per word. What is not
a word (a list's bullet, a figure) has no glyphs.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

CHARSET = [chr(c) for c in range(33, 127)]  # printable ASCII without space; anything else is the last class
CHAR_INDEX = {c: i for i, c in enumerate(CHARSET)}
N_CLASSES = len(CHARSET) + 1  # the characters + "other"
CELL = 64  # view pixels one vision slot covers (patch 16 x the 16x compressor's 4 per side)
PATCH = 16  # view pixels one position of SAM's neck covers


def char_class(c: str) -> int:
    """Class of a character: its index in :data:`CHARSET`, or the last class for anything else."""
    return CHAR_INDEX.get(c, len(CHARSET))


def page_glyphs(page: Any, view_size: int) -> np.ndarray:
    """[n, 4] float32 (class, x centre, top, bottom) of every non-space character of ``page.words``
    (``page.size`` = (w, h); each word a ``text`` and a ``box_px``), in global-view pixels."""
    w, h = page.size
    m = max(w, h)
    scale = view_size / m
    ox, oy = (m - w) / 2, (m - h) / 2
    rows = []
    for piece in page.words:
        x1, y1, x2, y2 = piece.box_px
        chars = [c for c in piece.text if not c.isspace()]
        step = (x2 - x1) / max(1, len(chars))
        for k, c in enumerate(chars):
            rows.append((char_class(c), (x1 + (k + 0.5) * step + ox) * scale, (y1 + oy) * scale, (y2 + oy) * scale))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


def crop_page(page: Any, task: str, piece: Any, crop_scale: str = "crop") -> SimpleNamespace:
    """The page a ``line``/``word``/``block`` sample shows (:func:`pipeline.synth.piece_image`): the words
    inside the crop's box (the one :func:`pipeline.synth.piece_crop` cuts), moved to where
    ``crop_scale`` puts the crop on its canvas (:func:`pipeline.synth.piece_layout`)."""
    from pipeline.synth import TextPiece, piece_crop_box, piece_layout

    cx1, cy1, _, _ = piece_crop_box(page.size, piece)
    inside = [piece]
    if task in ("line", "block"):
        x1, y1, x2, y2 = piece.box_px
        inside = [w for w in page.words if w.box_px[0] >= x1 - 1 and w.box_px[2] <= x2 + 1
                  and y1 <= (w.box_px[1] + w.box_px[3]) / 2 <= y2]
    size, (ox, oy) = piece_layout(page.size, piece, crop_scale, page.page_id)
    dx, dy = ox - cx1, oy - cy1
    moved = [TextPiece(w.text, (w.box_px[0] + dx, w.box_px[1] + dy, w.box_px[2] + dx, w.box_px[3] + dy))
             for w in inside]
    return SimpleNamespace(size=size, words=moved)


def cell_targets(glyphs: np.ndarray, view_size: int) -> np.ndarray:
    """[g*g, N_CLASSES] uint8 multi-hot, row-major over the view's 64 px slot cells: the classes
    of the characters whose centres fall in each cell (a glyph counts in every cell row the
    middle half of its height reaches). Vectorised: the trainer builds these for ~128 views a step."""
    g = view_size // CELL
    out = np.zeros((g * g, N_CLASSES), dtype=np.uint8)
    cls, x, top, bottom = _columns(glyphs)
    inset = (bottom - top) / 4
    col = np.clip(x // CELL, 0, g - 1).astype(np.int64)
    first = np.maximum(0, (top + inset) // CELL).astype(np.int64)
    last = np.minimum(g - 1, (bottom - inset) // CELL).astype(np.int64)
    for k in range(int((last - first).max(initial=-1)) + 1):  # a glyph spans a cell row or two
        hit = first + k <= last
        out[(first[hit] + k) * g + col[hit], cls[hit]] = 1
    return out


def patch_targets(glyphs: np.ndarray, view_size: int) -> np.ndarray:
    """[p*p] int64, row-major over the view's 16 px patches: 1 + the class of the character whose
    centre falls in the patch (the last one where several do), 0 for none."""
    gp = view_size // PATCH
    out = np.zeros(gp * gp, dtype=np.int64)
    cls, x, top, bottom = _columns(glyphs)
    row = np.clip(((top + bottom) / 2) // PATCH, 0, gp - 1).astype(np.int64)
    col = np.clip(x // PATCH, 0, gp - 1).astype(np.int64)
    index = (row * gp + col)[::-1]  # reversed, so np.unique's first occurrence is the last drawn
    patches, last = np.unique(index, return_index=True)
    out[patches] = cls[::-1][last] + 1
    return out


def patches_by_cell(patches: np.ndarray, view_size: int) -> np.ndarray:
    """[..., g*g, 16]: [..., p*p] row-major per-patch values (e.g. :func:`patch_targets`') regrouped
    by the 64 px slot cell they lie in (cells row-major, each cell's 4 x 4 patches row-major): the
    in-place target of a slot. Unlike :func:`cell_targets`' bag of characters, it says where in the
    cell each character lies, which reading needs."""
    g, side = view_size // CELL, CELL // PATCH
    lead = patches.shape[:-1]
    grid = patches.reshape(*lead, g, side, g, side)
    grid = np.moveaxis(grid, -3, -2)  # [..., g, g, side, side]
    return np.ascontiguousarray(grid).reshape(*lead, g * g, side * side)


def _columns(glyphs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(class, x, top, bottom) of an [n, 4] glyph array, the geometry in float64 (Python's floats)."""
    g = np.asarray(glyphs, dtype=np.float64).reshape(-1, 4)
    return g[:, 0].astype(np.int64), g[:, 1], g[:, 2], g[:, 3]


def encode_glyphs(glyphs: np.ndarray) -> bytes:
    """A shard column's bytes for a glyph array (see :func:`decode_glyphs`)."""
    return np.ascontiguousarray(glyphs, dtype=np.float32).tobytes()


def decode_glyphs(data: bytes) -> np.ndarray:
    """The [n, 4] glyph array of a shard column's bytes."""
    buf = np.frombuffer(bytearray(data), dtype=np.float32)
    if buf.size % 4:
        raise ValueError(f"glyphs: {buf.size} floats are not rows of 4")
    return buf.reshape(-1, 4)
