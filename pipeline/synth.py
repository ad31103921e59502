"""Synthetic document pages: image + markdown + grounding boxes + plain text, deterministically.

Why: the project needs data with exact targets for demos, tests and the first training stages,
and it must run anywhere with no downloads. Pages are drawn with PIL from the project's own
corpus (``pipeline/corpus/*.txt``) in the DejaVu/STIX fonts that ship with matplotlib.

Determinism: page ``i`` of ``(seed, split)`` is drawn from ``random.Random`` and a numpy
``Generator`` seeded by exactly those three values, so the same arguments give byte-identical
PNGs (on the same Pillow/FreeType build).

Held-out data: ``split="heldout"`` draws text from a disjoint fifth of every corpus file
(lines ``i % 5 == 4``), uses the config's ``heldout_fonts`` (the document profile adds STIX,
never seen in training) and different layout seeds.

Manifest: ``generate`` writes ``out_dir/manifest.jsonl``; each record's ``image`` is a POSIX
path *relative to the manifest's directory* (``images/<id>.png``): resolve it by joining it
to that directory. Records follow DESIGN.md's vision record ``{id, image, prompt, response,
task}`` plus ``split``, ``page`` and, for page-level tasks, ``boxes: [{label, box}]`` (0..999)
for evaluation.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import math
import os
import random
import re
import sys
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from model.grounding import COORD_MAX, format_grounding

PROMPT_GROUNDING = "<image>\n<|grounding|>Convert the document to markdown."
PROMPT_FREE = "<image>\nFree OCR."
LABELS = ("title", "text", "list", "table", "image")
TASKS = ("markdown", "free", "line", "word", "block")
CROP_TASKS = ("line", "word", "block")  # tasks that show one piece of a page (crop_pieces), read with the free prompt
BLOCK_LABELS = ("text", "list")  # blocks a ``block`` crop shows: running text, where a reader must follow a wrap
_TASK_ALIASES = {"lines": "line", "words": "word", "blocks": "block", "md": "markdown"}
SPLITS = ("train", "heldout")
BULLET = "\u2022"

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"

# Font families: (regular, bold, italic) file names in matplotlib's mpl-data/fonts/ttf.
FONT_FAMILIES: dict[str, tuple[str, str, str]] = {
    "sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"),
    "serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"),
    "mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf"),
    "stix": ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf"),
    # TeX's Computer Modern as matplotlib ships it (BaKoMa's TTFs): a second design lineage beside
    # DejaVu's to train on. Their layout is TeX's OT1, so '"<>\\^_{|}~' draw other glyphs (pages'
    # text never has them: tests/test_synth_fonts.py holds that) and there is no bullet (a list's
    # marker is drawn in GLYPH_FALLBACK_FAMILY). Sans and typewriter come in one weight only.
    "cm_roman": ("cmr10.ttf", "cmb10.ttf", "cmti10.ttf"),
    "cm_sans": ("cmss10.ttf", "cmss10.ttf", "cmss10.ttf"),
    "cm_typewriter": ("cmtt10.ttf", "cmtt10.ttf", "cmtt10.ttf"),
}
GLYPH_FALLBACK_FAMILY = "sans"  # draws what a family has no glyph for (glyph_font)


# ------------------------------------------------------------------------------------ config


@dataclass
class SynthConfig:
    """How pages look. Sizes are pixels at the page's own resolution."""

    profile: str = "document"
    width_range: tuple[int, int] = (640, 1280)
    aspect_range: tuple[float, float] = (1.38, 1.45)  # height / width; A4 is 1.414
    blocks_range: tuple[int, int] = (4, 12)  # blocks per page (fewer when the page fills up)
    font_size_range: tuple[int, int] = (16, 28)  # body text size
    min_font_px: int = 16  # floor: cap height stays >= ~12 px at the page's resolution
    text_scale: float = 1.0  # multiplies the sampled body size (before the floor)
    min_chars_per_line: int = 40  # caps the size so a column holds about this many characters
    margin_range: tuple[float, float] = (0.05, 0.1)  # fraction of the page width
    columns: tuple[int, ...] = (1, 2)  # column counts to choose from
    two_column_min_width: int = 900  # narrower pages always use one column
    line_spacing_range: tuple[float, float] = (1.1, 1.45)
    # train split only: line spacing drawn from this range instead (held-out pages keep line_spacing_range).
    # Spacing multiplies a font's ascent + descent, which is 1.4-1.65 cap heights in the training fonts and
    # 2.26 in STIX: held-out STIX lines sit farther apart, relative to their letters, than any trained page's,
    # and readings end a paragraph at each wrap (bench/RESULTS.md, session 28)
    train_line_spacing_range: tuple[float, float] | None = None
    block_weights: dict[str, float] = field(
        default_factory=lambda: {"text": 0.45, "title": 0.12, "list": 0.18, "table": 0.15, "image": 0.10}
    )
    page_title_prob: float = 0.85  # a '# ' title spanning the page first
    title_scale: tuple[float, float] = (1.5, 2.1)  # page title size / body size
    justify_prob: float = 0.3
    paragraph_sentences: tuple[int, int] = (2, 5)
    list_items: tuple[int, int] = (2, 5)
    table_rows: tuple[int, int] = (2, 5)  # body rows (plus a header row)
    table_cols: tuple[int, int] = (2, 4)
    vocab_size: int | None = None  # set: text is random words from this many frequent corpus words
    word_salad_prob: float = 0.0  # train split only: a sentence/item/title is random words of the split
    salad_number_prob: float = 0.08  # in word salad, a word is a number or a code instead
    # in word salad, a word is a pseudo-word: letters from a trigram model of the split's words
    # (pipeline.synth.pseudo_word), so a decoder cannot settle on a closed word list
    pseudo_word_prob: float = 0.0
    sentence_words: tuple[int, int] = (3, 7)  # words per sentence when vocab_size is set
    item_words: tuple[int, int] = (1, 3)  # words per list item when vocab_size is set
    noise: float = 0.5  # strength: gaussian sigma up to 6 * noise grey levels, slight blur
    noise_prob: float = 0.3  # fraction of pages degraded (noisy PNGs are large and slow to write)
    rotation_deg: float = 0.0  # max tilt; off by default (boxes are not rotated with the page)
    stretch_range: tuple[float, float] = (1.0, 1.0)  # horizontal page scale (glyph shapes vary; 0..999 boxes hold)
    train_fonts: tuple[str, ...] = ("sans", "serif", "mono")
    heldout_fonts: tuple[str, ...] = ("stix", "serif", "sans")
    tasks: tuple[str, ...] = ("markdown", "free")
    max_line_crops: int = 6  # per page, for task 'line'
    max_word_crops: int = 6  # per page, for task 'word'
    max_block_crops: int = 4  # per page, for task 'block' (a paragraph or list of two or more lines)
    # line/word/block crop files: "crop" (the piece alone; resized to the view its text is larger than the
    # page's), "page" (left where it was on an empty page-sized canvas, at the page's text size) or
    # "zoom" (a size drawn between the two): piece_layout
    crop_scale: str = "crop"
    seed: int = 0

    @classmethod
    def document(cls, **overrides: Any) -> "SynthConfig":
        """Default A4-like pages, 640..1280 px wide, 1-2 columns, mild noise."""
        return replace(cls(), **overrides)

    @classmethod
    def easy(cls, **overrides: Any) -> "SynthConfig":
        """Small square pages, big clean text, 1-3 short blocks, ~150-word vocabulary.

        Meant for a tiny model to learn reading and grounding quickly. Held-out pages share
        the vocabulary and font but not the word sequences or layouts.
        """
        base = cls(
            profile="easy",
            width_range=(512, 512),
            aspect_range=(1.0, 1.0),
            blocks_range=(1, 3),
            font_size_range=(28, 36),
            min_font_px=20,
            min_chars_per_line=14,
            margin_range=(0.06, 0.1),
            columns=(1,),
            line_spacing_range=(1.15, 1.3),
            block_weights={"text": 0.4, "title": 0.2, "list": 0.25, "table": 0.1, "image": 0.05},
            page_title_prob=0.5,
            title_scale=(1.15, 1.5),
            justify_prob=0.0,
            paragraph_sentences=(1, 2),
            list_items=(2, 3),
            table_rows=(1, 2),
            table_cols=(2, 3),
            vocab_size=150,
            noise=0.0,
            train_fonts=("sans",),
            heldout_fonts=("sans",),
        )
        return replace(base, **overrides)

    @classmethod
    def reading(cls, **overrides: Any) -> "SynthConfig":
        """Tier 2: learn to *read*, not to recall. Square-ish pages about 640 px wide (the
        ``small`` mode's view), 1-4 blocks of clear 24-32 px text, three training fonts.

        Training text is mostly word salad (random words of the training split, numbers and
        codes) so that a model cannot lean on remembered sentences, and pages are stretched
        horizontally so glyph widths vary. Held-out pages use sentences the
        training split never has, layouts from other seeds and STIX, a font never trained on.
        """
        base = cls(
            profile="reading",
            width_range=(600, 700),
            aspect_range=(1.0, 1.3),
            blocks_range=(1, 4),
            font_size_range=(24, 32),
            min_font_px=20,
            min_chars_per_line=24,
            margin_range=(0.05, 0.09),
            columns=(1,),
            line_spacing_range=(1.15, 1.4),
            block_weights={"text": 0.5, "title": 0.15, "list": 0.2, "table": 0.1, "image": 0.05},
            page_title_prob=0.6,
            title_scale=(1.2, 1.6),
            justify_prob=0.2,
            paragraph_sentences=(1, 3),
            list_items=(2, 4),
            table_rows=(1, 3),
            table_cols=(2, 3),
            noise=0.4,
            noise_prob=0.3,
            word_salad_prob=0.9,
            stretch_range=(0.85, 1.15),
            train_fonts=("sans", "serif", "mono"),
            heldout_fonts=("stix",),
        )
        return replace(base, **overrides)

    @classmethod
    def from_profile(cls, name: str, **overrides: Any) -> "SynthConfig":
        if name not in PROFILES:
            raise ValueError(f"unknown synth profile {name!r}; choose one of {sorted(PROFILES)}")
        return getattr(cls, name)(**overrides)

    @classmethod
    def from_yaml_overrides(cls, profile: str, overrides: Mapping[str, Any], where: str,
                            **settings: Any) -> "SynthConfig":
        """``profile`` with a YAML mapping of fields over it (lists become tuples) and the
        caller's own ``settings``. An unknown field, or one the caller sets itself, is an error
        that names ``where`` (the mapping's place in the YAML)."""
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown {where} fields: {unknown}")
        taken = sorted(set(overrides) & set(settings))
        if taken:
            raise ValueError(f"{where} may not set {taken}: they come from elsewhere in the config")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        return cls.from_profile(profile, **values, **settings)

    def validate(self) -> None:
        bad = [k for k in self.block_weights if k not in LABELS]
        if bad:
            raise ValueError(f"block_weights has unknown labels {bad}; labels are {LABELS}")
        if sum(max(0.0, w) for w in self.block_weights.values()) <= 0:
            raise ValueError("block_weights must have a positive weight")
        for name in ("word_salad_prob", "salad_number_prob", "pseudo_word_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("width_range", "aspect_range", "blocks_range", "font_size_range", "stretch_range",
                     "line_spacing_range", "train_line_spacing_range"):
            if getattr(self, name) is None:
                continue
            lo, hi = getattr(self, name)
            if lo > hi or lo <= 0:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        unknown = [t for t in normalise_tasks(self.tasks) if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; choose from {TASKS}")
        if self.crop_scale not in CROP_SCALES:
            raise ValueError(f"crop_scale must be one of {', '.join(CROP_SCALES)}, got {self.crop_scale!r}")
        for fam in (*self.train_fonts, *self.heldout_fonts):
            if fam not in FONT_FAMILIES:
                raise ValueError(f"unknown font family {fam!r}; choose from {sorted(FONT_FAMILIES)}")


PROFILES = ("easy", "document", "reading")  # the SynthConfig constructors of that name
CROP_SCALES = ("crop", "page", "zoom")  # how a crop task's piece is shown (SynthConfig.crop_scale; piece_layout)


def normalise_tasks(tasks: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    return tuple(_TASK_ALIASES.get(t.strip(), t.strip()) for t in tasks)


# ------------------------------------------------------------------------------------ corpus


@dataclass(frozen=True)
class CorpusSplit:
    sentences: tuple[str, ...]
    titles: tuple[str, ...]
    items: tuple[str, ...]
    terms: tuple[str, ...]
    headers: tuple[str, ...]
    vocab: tuple[str, ...]  # frequent words of the whole corpus (shared by both splits)
    words: tuple[str, ...] = ()  # every distinct word (lower case) of this split's own lines


def _read_lines(name: str) -> list[str]:
    path = CORPUS_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"synthetic corpus file {path} is missing (package data pipeline/corpus/*.txt)")
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        s = raw.strip()
        if s and not s.startswith("#"):
            lines.append(s)
    return lines


def _split_lines(lines: list[str], split: str) -> tuple[str, ...]:
    keep = (lambda i: i % 5 == 4) if split == "heldout" else (lambda i: i % 5 != 4)
    return tuple(s for i, s in enumerate(lines) if keep(i))


@lru_cache(maxsize=None)
def load_corpus(split: str = "train", vocab_size: int = 150) -> CorpusSplit:
    """The split's share of every corpus file; held-out is every fifth line."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    prose = _read_lines("prose.txt")
    counts = Counter(w.lower() for s in prose for w in re.findall(r"[A-Za-z]+", s) if len(w) > 1 or w in "aA")
    vocab = tuple(sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size])
    parts = {name: _split_lines(_read_lines(f"{name}.txt"), split) for name in ("titles", "items", "terms", "headers")}
    sentences = _split_lines(prose, split)
    own = {w.lower() for line in (*sentences, *parts["titles"], *parts["items"]) for w in re.findall(r"[A-Za-z]+", line)}
    return CorpusSplit(sentences=sentences, vocab=vocab, words=tuple(sorted(own)), **parts)


_WORD_START, _WORD_END = "^", "$"


@lru_cache(maxsize=8)
def _letter_trigrams(words: tuple[str, ...]) -> tuple[dict[str, tuple[tuple[str, ...], tuple[int, ...]]], frozenset]:
    """For each two-letter context (``^`` pads a word's start), the letters that follow it in
    ``words`` (``$``: the word ends) and their cumulative counts, ready for ``random.choices``;
    and the words as a set."""
    counts: dict[str, Counter] = {}
    for word in words:
        padded = _WORD_START * 2 + word + _WORD_END
        for i in range(2, len(padded)):
            counts.setdefault(padded[i - 2:i], Counter())[padded[i]] += 1
    table = {}
    for context, after in counts.items():
        letters = tuple(sorted(after))
        cumulative, total = [], 0
        for letter in letters:
            total += after[letter]
            cumulative.append(total)
        table[context] = (letters, tuple(cumulative))
    return table, frozenset(words)


def pseudo_word(words: tuple[str, ...], rng: random.Random, min_len: int = 2, max_len: int = 12,
                tries: int = 8) -> str:
    """A word-like string of letters that ``words`` does not contain (when ``tries`` allow).

    Why: a decoder trained on random words of a fixed list learns the list and, on a page with
    words it never saw, writes the nearest listed word ('Claims' -> 'Climbs'). Letters drawn from
    the list's own trigram statistics look like words but can only be read, not recalled.
    """
    if not words:
        raise ValueError("pseudo_word needs a non-empty word list")
    table, known = _letter_trigrams(words)
    word = ""
    for _ in range(tries):
        context, letters = _WORD_START * 2, []
        while len(letters) < max_len:
            choices, cumulative = table[context]
            letter = rng.choices(choices, cum_weights=cumulative)[0]
            if letter == _WORD_END:
                break
            letters.append(letter)
            context = context[1] + letter
        word = "".join(letters)
        if len(word) >= min_len and word not in known:
            return word
    return word if len(word) >= min_len else rng.choice(words)


class TextSource:
    """Draws titles, paragraphs, list items and table cells for one page."""

    def __init__(self, corpus: CorpusSplit, cfg: SynthConfig, rng: random.Random, split: str = "train"):
        self.c, self.cfg, self.rng = corpus, cfg, rng
        self.words = cfg.vocab_size is not None
        self.salad = cfg.word_salad_prob if split == "train" and corpus.words else 0.0
        self.used: set[str] = set()

    def _salad_now(self) -> bool:
        return self.salad > 0 and self.rng.random() < self.salad

    def _salad_word(self) -> str:
        r = self.rng
        if r.random() < self.cfg.salad_number_prob:
            kind = r.randrange(4)
            if kind == 0:
                return str(r.randint(0, 9999))
            if kind == 1:
                return f"{r.uniform(0, 100):.{r.randint(1, 2)}f}"
            if kind == 2:
                return f"{r.randint(1, 99)}%"
            letters = "".join(r.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(r.randint(1, 3)))
            return f"{letters}-{r.randint(1, 999)}"
        if self.cfg.pseudo_word_prob and r.random() < self.cfg.pseudo_word_prob:
            w = pseudo_word(self.c.words, r)
        else:
            w = r.choice(self.c.words)
        return w.capitalize() if r.random() < 0.1 else w

    def _salad(self, lo: int, hi: int, punct: bool) -> str:
        ws = [self._salad_word() for _ in range(self.rng.randint(lo, hi))]
        if punct and len(ws) > 3 and self.rng.random() < 0.4:
            k = self.rng.randrange(1, len(ws) - 1)
            ws[k] += self.rng.choice(",,;:")
        text = " ".join([ws[0][:1].upper() + ws[0][1:], *ws[1:]])
        return text + (self.rng.choice("..!?") if punct else "")

    def _fresh(self, draw: Callable[[], str], tries: int = 6) -> str:
        """A draw not yet used on this page (repeats only when the pool runs dry)."""
        for _ in range(tries):
            s = draw()
            if s not in self.used:
                break
        self.used.add(s)
        return s

    def _word_run(self, lo: int, hi: int) -> list[str]:
        return [self.rng.choice(self.c.vocab) for _ in range(self.rng.randint(lo, hi))]

    def title(self) -> str:
        if self._salad_now():
            return self._fresh(lambda: " ".join(w.capitalize() for w in self._salad(1, 4, False).split()))
        if self.words:
            return self._fresh(lambda: " ".join(w.capitalize() for w in self._word_run(1, 3)))
        return self._fresh(lambda: self.rng.choice(self.c.titles))

    def sentence(self) -> str:
        if self._salad_now():
            return self._salad(4, 12, True)
        if self.words:
            ws = self._word_run(*self.cfg.sentence_words)
            return " ".join([ws[0].capitalize(), *ws[1:]]) + "."
        return self.rng.choice(self.c.sentences)

    def paragraph(self) -> str:
        n = self.rng.randint(*self.cfg.paragraph_sentences)
        if self.words or self._salad_now():
            return " ".join(self.sentence() for _ in range(n))
        sents = self.c.sentences
        for _ in range(6):  # consecutive lines share a topic; avoid reusing a sentence on the page
            start = self.rng.randrange(len(sents))
            picked = [sents[(start + k) % len(sents)] for k in range(n)]
            if not self.used.intersection(picked):
                break
        self.used.update(picked)
        return " ".join(picked)

    def item(self) -> str:
        if self._salad_now():
            return self._salad(1, 6, False)
        if self.words:
            ws = self._word_run(*self.cfg.item_words)
            return " ".join([ws[0].capitalize(), *ws[1:]])
        pool = self.c.items if self.rng.random() < 0.6 else self.c.sentences
        return self._fresh(lambda: self.rng.choice(pool))

    def header(self) -> str:
        pool = self.c.vocab if self.words else self.c.headers
        return self._fresh(lambda: self.rng.choice(pool).capitalize())

    def label_cell(self) -> str:
        pool = self.c.vocab if self.words else self.c.terms
        return self._fresh(lambda: self.rng.choice(pool))

    def number_cell(self, style: int) -> str:
        r = self.rng
        if self.words or style == 0:
            return str(r.randint(0, 99 if self.words else 999))
        if style == 1:
            return f"{r.uniform(0, 100):.1f}"
        if style == 2:
            return f"{r.randint(0, 100)}%"
        if style == 3:
            return str(r.randint(1990, 2025))
        return f"{r.randint(1, 9999):,}"


# ------------------------------------------------------------------------------------- fonts


FONT_DIR_ENV = "NDOCR_FONT_DIR"  # a folder with the FONT_FAMILIES files, for machines without matplotlib


@lru_cache(maxsize=1)
def font_dir() -> Path | None:
    """``$NDOCR_FONT_DIR``, else matplotlib's bundled TTF directory (found without importing
    matplotlib if possible)."""
    candidates = [Path(os.environ[FONT_DIR_ENV])] if os.environ.get(FONT_DIR_ENV) else []
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf")
    for d in candidates:
        if (d / FONT_FAMILIES["sans"][0]).exists():
            return d
    try:
        import matplotlib

        d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
        return d if d.exists() else None
    except Exception:
        return None


def missing_font_files(directory: Path | None = None) -> list[str]:
    """FONT_FAMILIES' files that ``directory`` (default: :func:`font_dir`) does not hold."""
    d = directory or font_dir()
    names = sorted({name for files in FONT_FAMILIES.values() for name in files})
    return names if d is None else [n for n in names if not (d / n).exists()]


@lru_cache(maxsize=512)
def get_font(family: str, style: int, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """style 0 regular, 1 bold, 2 italic. With no font directory at all, PIL's default font and a
    warning; a directory without the family's file is an error (pages would silently change font)."""
    d = font_dir()
    if d is not None:
        path = d / FONT_FAMILIES[family][style]
        if not path.exists():
            raise FileNotFoundError(f"font family {family!r} needs {path.name} in {d} (missing: "
                                    f"{missing_font_files(d)}; ${FONT_DIR_ENV} names the folder)")
        return ImageFont.truetype(str(path), size)
    warnings.warn(f"font {family!r} not found (matplotlib's fonts/ttf); using PIL's default font", stacklevel=2)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


_NO_GLYPH = "\U0010fffd"  # a private-use code point no font here maps: it draws the font's .notdef


@lru_cache(maxsize=16)
def _probe_font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, 32)


def _glyph_signature(font: ImageFont.FreeTypeFont, ch: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(ch)
    return mask.size, bytes(mask)


@lru_cache(maxsize=4096)
def font_has_glyph(path: str, ch: str) -> bool:
    """Whether the font file maps ``ch`` to a glyph of its own (not its .notdef box)."""
    probe = _probe_font(path)
    return _glyph_signature(probe, ch) != _glyph_signature(probe, _NO_GLYPH)


def glyph_font(font: Any, text: str) -> Any:
    """``font``, or GLYPH_FALLBACK_FAMILY's regular face at its size where ``font`` has no glyph
    for a character of ``text`` (Computer Modern has no bullet): a page never shows .notdef boxes
    that its reference text calls something else."""
    path = getattr(font, "path", None)
    if not isinstance(path, str) or all(font_has_glyph(path, c) for c in text if not c.isspace()):
        return font
    return get_font(GLYPH_FALLBACK_FAMILY, 0, int(font.size))


@lru_cache(maxsize=65536)
def _text_len(font: Any, s: str) -> float:
    return font.getlength(s)


def _metrics(font: Any) -> tuple[int, int]:
    try:
        return font.getmetrics()
    except AttributeError:
        b = font.getbbox("Ag")
        return -b[1] if b[1] < 0 else b[3], 2


# ------------------------------------------------------------------------------------ layout


@dataclass
class TextPiece:
    """A word, line or block of text and its pixel box on the page."""

    text: str
    box_px: tuple[int, int, int, int]
    line_px: int = 0  # a block's line height (its crop's side padding follows it); 0: the box is one line


@dataclass
class SynthBlock:
    label: str
    box_px: tuple[int, int, int, int]  # ink box (padded), page pixels
    box: tuple[int, int, int, int]  # 0..999 of the page
    markdown: str  # block markdown (empty for images in the grounding target)
    text: str  # plain text of the block ('' for images)


@dataclass
class SynthPage:
    page_id: str
    image: Image.Image
    blocks: list[SynthBlock]
    markdown: str
    grounding: str
    plain_text: str
    lines: list[TextPiece]
    words: list[TextPiece]
    font_family: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


@dataclass
class _Op:
    kind: str  # 'text' | 'line' | 'rect' | 'figure'
    args: tuple


@dataclass
class _Laid:
    """A block laid out at origin (0, 0) of its column: draw ops and pieces in local pixels."""

    label: str
    height: int
    ops: list[_Op]
    ink: list[tuple[float, float, float, float]]
    lines: list[TextPiece]
    words: list[TextPiece]
    markdown: str
    text: str


def _union(boxes: Sequence[Sequence[float]]) -> tuple[float, float, float, float]:
    xs1, ys1, xs2, ys2 = zip(*boxes)
    return min(xs1), min(ys1), max(xs2), max(ys2)


def _wrap(words: list[str], font: Any, width: float, indent: float = 0.0) -> list[list[str]]:
    """Greedy word wrap; a word longer than the line gets a line of its own."""
    space = _text_len(font, " ")
    lines: list[list[str]] = []
    cur: list[str] = []
    cur_w = 0.0
    for w in words:
        ww = _text_len(font, w)
        if cur and indent + cur_w + space + ww > width:
            lines.append(cur)
            cur, cur_w = [w], ww
        else:
            cur_w = ww if not cur else cur_w + space + ww
            cur.append(w)
    if cur:
        lines.append(cur)
    return lines


class _Writer:
    """Collects draw ops and text pieces for lines of words at known positions."""

    def __init__(self, font: Any, ink: tuple[int, int, int], spacing: float):
        self.font, self.ink = font, ink
        self.ascent, self.descent = _metrics(font)
        self.line_h = int(math.ceil((self.ascent + self.descent) * spacing))
        self.ops: list[_Op] = []
        self.ink_boxes: list[tuple[float, float, float, float]] = []
        self.lines: list[TextPiece] = []
        self.words: list[TextPiece] = []

    def line(self, words: list[str], x: float, top: float, width: float | None = None,
             justify: bool = False, prefix: str | None = None, prefix_x: float = 0.0) -> None:
        base = top + self.ascent
        space = _text_len(self.font, " ")
        gap = space
        if justify and width is not None and len(words) > 1:
            natural = sum(_text_len(self.font, w) for w in words) + space * (len(words) - 1)
            gap = space + (width - natural) / (len(words) - 1)
        pieces = []
        if prefix:
            pieces.append((prefix, prefix_x, glyph_font(self.font, prefix)))
        cx = x
        for w in words:
            pieces.append((w, cx, self.font))
            cx += _text_len(self.font, w) + gap
        line_boxes = []
        for k, (w, px, font) in enumerate(pieces):
            self.ops.append(_Op("text", (round(px), round(base), w, font, self.ink)))
            b = font.getbbox(w, anchor="ls")
            wb = (round(px) + b[0], round(base) + b[1], round(px) + b[2], round(base) + b[3])
            self.ink_boxes.append(wb)
            line_boxes.append(wb)
            if not (prefix and k == 0):
                self.words.append(TextPiece(w, wb))
        x1, _, x2, _ = _union(line_boxes)
        text = " ".join(([prefix] if prefix else []) + words)
        self.lines.append(TextPiece(text, (x1, round(top), x2, round(top) + self.ascent + self.descent)))


def _lay_paragraph(text: str, font: Any, width: int, ink, spacing: float, justify: bool,
                   max_h: int | None, label: str = "text", md_prefix: str = "") -> _Laid | None:
    """Wrapped text; with max_h, keeps only the lines that fit (None if not even one does)."""
    wr = _Writer(font, ink, spacing)
    words = text.split()
    if not words or max(_text_len(font, w) for w in words) > width:
        return None  # nothing to draw, or a word wider than the column
    lines = _wrap(words, font, width)
    if max_h is not None:
        fit = (max_h - (wr.ascent + wr.descent)) // wr.line_h + 1 if max_h >= wr.ascent + wr.descent else 0
        if fit < len(lines):
            if label == "title" or fit < 2:
                return None  # never cut a heading; a cut paragraph keeps at least two lines
            lines = lines[:fit]
    for i, ws in enumerate(lines):
        wr.line(ws, 0, i * wr.line_h, width, justify=justify and i < len(lines) - 1)
    kept = " ".join(w for ws in lines for w in ws)
    height = (len(lines) - 1) * wr.line_h + wr.ascent + wr.descent
    return _Laid(label, height, wr.ops, wr.ink_boxes, wr.lines, wr.words, md_prefix + kept, kept)


def _lay_list(items: list[str], numbered: bool, font: Any, width: int, ink, spacing: float,
              max_h: int | None) -> _Laid | None:
    """Items with a hanging indent; keeps whole items that fit (at least two)."""
    wr = _Writer(font, ink, spacing)
    markers = [f"{i + 1}." if numbered else BULLET for i in range(len(items))]
    indent = max(_text_len(glyph_font(font, m), m) for m in markers) + _text_len(font, "  ")
    if not items or max(_text_len(font, w) for it in items for w in it.split()) > width - indent:
        return None
    item_gap = wr.line_h * 0.25
    y = 0.0
    kept: list[int] = []
    plans = []
    for i, it in enumerate(items):
        lines = _wrap(it.split(), font, width - indent)
        h = (len(lines) - 1) * wr.line_h + wr.ascent + wr.descent
        if max_h is not None and y + h > max_h:
            break
        plans.append((i, lines, y))
        kept.append(i)
        y += h + item_gap + (wr.line_h - wr.ascent - wr.descent)
    if len(kept) < min(2, len(items)):
        return None
    for i, lines, top in plans:
        for j, ws in enumerate(lines):
            wr.line(ws, indent, top + j * wr.line_h, prefix=markers[i] if j == 0 else None, prefix_x=0)
    last_i, last_lines, last_top = plans[-1]
    height = int(last_top + (len(last_lines) - 1) * wr.line_h + wr.ascent + wr.descent)
    md = "\n".join(f"{k + 1}. {items[k]}" if numbered else f"- {items[k]}" for k in kept)
    plain = "\n".join(f"{markers[k]} {items[k]}" for k in kept)
    return _Laid("list", height, wr.ops, wr.ink_boxes, wr.lines, wr.words, md, plain)


def _lay_table(rows: list[list[str]], font: Any, bold: Any, width: int, ink, rng: random.Random,
               max_h: int | None) -> _Laid | None:
    """A ruled table: outer frame, header rule, optional row and column rules."""
    pad_x = max(6, font.size // 2) if hasattr(font, "size") else 8
    pad_y = max(4, font.size // 3) if hasattr(font, "size") else 6
    ncols = len(rows[0])
    while ncols >= 2:
        col_w = [max(_text_len(bold if r == 0 else font, rows[r][c]) for r in range(len(rows))) + 2 * pad_x
                 for c in range(ncols)]
        if sum(col_w) <= width:
            break
        ncols -= 1
    else:
        return None
    rows = [r[:ncols] for r in rows]
    col_w = [int(math.ceil(w)) for w in col_w]
    asc, desc = _metrics(font)
    row_h = asc + desc + 2 * pad_y
    n_rows = len(rows)
    if max_h is not None:
        fit = (max_h - 2) // row_h
        if fit < 2:
            return None
        n_rows = min(n_rows, fit)
        rows = rows[:n_rows]
    stretch = rng.random() < 0.4  # some tables span the column
    if stretch:
        extra = (width - sum(col_w)) // ncols
        col_w = [w + extra for w in col_w]
    total_w = sum(col_w)
    total_h = row_h * n_rows
    ops: list[_Op] = []
    ink_boxes: list[tuple[float, float, float, float]] = []
    words: list[TextPiece] = []
    lw = 1 if rng.random() < 0.6 else 2
    ops.append(_Op("rect", ((0, 0, total_w, total_h), ink, lw)))
    ink_boxes.append((0, 0, total_w + 1, total_h + 1))
    all_rules = rng.random() < 0.6
    for r in range(1, n_rows):
        if r == 1 or all_rules:
            ops.append(_Op("line", ((0, r * row_h, total_w, r * row_h), ink, lw if r > 1 else lw + 1)))
    if rng.random() < 0.6:
        x = 0
        for c in range(ncols - 1):
            x += col_w[c]
            ops.append(_Op("line", ((x, 0, x, total_h), ink, lw)))
    for r, row in enumerate(rows):
        f = bold if r == 0 else font
        x = 0
        for c, cell in enumerate(row):
            base = r * row_h + pad_y + asc
            tx = x + pad_x
            ops.append(_Op("text", (tx, base, cell, f, ink)))
            b = f.getbbox(cell, anchor="ls")
            wb = (tx + b[0], base + b[1], tx + b[2], base + b[3])
            for wtxt, wx in _word_positions(cell, f, tx):
                bb = f.getbbox(wtxt, anchor="ls")
                words.append(TextPiece(wtxt, (round(wx) + bb[0], base + bb[1], round(wx) + bb[2], base + bb[3])))
            ink_boxes.append(wb)
            x += col_w[c]
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c, quote=False)}</td>" for c in row) + "</tr>" for row in rows)
    plain = "\n".join(" ".join(row) for row in rows)
    return _Laid("table", total_h + 1, ops, ink_boxes, [], words, f"<table>{body}</table>", plain)


def _word_positions(text: str, font: Any, x: float) -> list[tuple[str, float]]:
    out = []
    cx = x
    space = _text_len(font, " ")
    for w in text.split(" "):
        if w:
            out.append((w, cx))
        cx += _text_len(font, w) + space
    return out


def _lay_figure(width: int, rng: random.Random, max_h: int | None, ink) -> _Laid | None:
    fw = int(width * rng.uniform(0.5, 1.0))
    fh = int(fw * rng.uniform(0.45, 0.75))
    if max_h is not None and fh > max_h:
        fh = max_h
        if fh < 0.3 * fw or fh < 40:
            return None
    x0 = rng.choice([0, (width - fw) // 2])
    kind = rng.choice(["bars", "line", "pie", "scatter", "shapes"])
    seed = rng.randrange(2**31)
    ops = [_Op("figure", ((x0, 0, x0 + fw, fh), kind, seed, ink))]
    return _Laid("image", fh, ops, [(x0, 0, x0 + fw, fh)], [], [], "", "")


def _draw_figure(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], kind: str, seed: int, ink) -> None:
    """A simple chart or a few shapes, filling ``box`` (always with a frame or axes: visible ink)."""
    r = random.Random(seed)
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    palette = [(r.randint(20, 220), r.randint(20, 220), r.randint(20, 220)) for _ in range(6)]
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=ink, width=1 + (r.random() < 0.3))
    px, py = x1 + int(w * 0.1), y1 + int(h * 0.08)
    qx, qy = x2 - int(w * 0.06), y2 - int(h * 0.12)
    if kind in ("bars", "line", "scatter"):
        draw.line([px, py, px, qy, qx, qy], fill=ink, width=2)
        for k in range(1, 5):
            ty = qy - (qy - py) * k / 5
            draw.line([px - 5, ty, px, ty], fill=ink, width=1)
    if kind == "bars":
        n = r.randint(3, 8)
        bw = (qx - px) / (n * 1.5 + 0.5)
        for i in range(n):
            bx = px + bw * (0.5 + 1.5 * i)
            top = qy - (qy - py) * r.uniform(0.15, 0.95)
            draw.rectangle([bx, top, bx + bw, qy - 1], fill=palette[i % len(palette)])
    elif kind == "line":
        for s in range(r.randint(1, 3)):
            n = r.randint(5, 12)
            v = r.uniform(0.2, 0.8)
            pts = []
            for i in range(n):
                v = min(0.95, max(0.05, v + r.uniform(-0.2, 0.2)))
                pts.append((px + (qx - px) * (i + 0.5) / n, qy - (qy - py) * v))
            draw.line(pts, fill=palette[s], width=2)
            for p in pts:
                draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=palette[s])
    elif kind == "scatter":
        for i in range(r.randint(15, 45)):
            cx, cy = r.uniform(px + 5, qx - 5), r.uniform(py + 5, qy - 5)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=palette[i % 3])
    elif kind == "pie":
        d = min(w, h) * 0.8
        cx, cy = x1 + w / 2, y1 + h / 2
        cuts = sorted(r.uniform(0, 360) for _ in range(r.randint(2, 5)))
        start = cuts[-1] - 360
        for i, c in enumerate(cuts):
            draw.pieslice([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], start, c, fill=palette[i], outline=ink)
            start = c
    else:
        for i in range(r.randint(2, 5)):
            sx1, sy1 = r.uniform(x1 + 5, x2 - 30), r.uniform(y1 + 5, y2 - 30)
            sx2, sy2 = r.uniform(sx1 + 15, x2 - 5), r.uniform(sy1 + 15, y2 - 5)
            shape = r.choice(["rect", "ellipse", "tri"])
            col = palette[i]
            if shape == "rect":
                draw.rectangle([sx1, sy1, sx2, sy2], fill=col, outline=ink)
            elif shape == "ellipse":
                draw.ellipse([sx1, sy1, sx2, sy2], fill=col, outline=ink)
            else:
                draw.polygon([(sx1, sy2), ((sx1 + sx2) / 2, sy1), (sx2, sy2)], fill=col, outline=ink)


# -------------------------------------------------------------------------------------- page


def _page_rngs(seed: int, split: str, index: int) -> tuple[random.Random, np.random.Generator]:
    rng = random.Random(f"ndocr-synth/{split}/{seed}/{index}")
    nrng = np.random.default_rng([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, zlib.crc32(split.encode()), index])
    return rng, nrng


def _to_999(box_px: Sequence[float], w: int, h: int) -> tuple[int, int, int, int]:
    """Pixel box -> 0..999 so that ``int(v / 999 * W)`` covers the original box."""
    x1, y1, x2, y2 = box_px
    c = lambda v: min(COORD_MAX, max(0, v))  # noqa: E731
    return (
        c(math.floor(x1 * COORD_MAX / w)),
        c(math.floor(y1 * COORD_MAX / h)),
        c(math.ceil(x2 * COORD_MAX / w)),
        c(math.ceil(y2 * COORD_MAX / h)),
    )


def page_id(index: int, seed: int, split: str) -> str:
    return f"{split}-s{seed}-{index:06d}"


def make_page(index: int, config: SynthConfig | None = None, seed: int | None = None,
              split: str = "train") -> SynthPage:
    """Draw page ``index`` of ``(seed, split)``: the image and every target for it."""
    cfg = config or SynthConfig()
    cfg.validate()
    seed = cfg.seed if seed is None else seed
    corpus = load_corpus(split, cfg.vocab_size or 150)
    rng, nrng = _page_rngs(seed, split, index)
    src = TextSource(corpus, cfg, rng, split)

    W = rng.randint(*cfg.width_range)
    H = int(round(W * rng.uniform(*cfg.aspect_range)))
    fonts = cfg.heldout_fonts if split == "heldout" else cfg.train_fonts
    family = rng.choice(fonts)
    head_family = rng.choice(fonts) if rng.random() < 0.3 else family
    ncols = rng.choice([c for c in cfg.columns if c == 1 or W >= cfg.two_column_min_width] or [1])
    margin = int(W * rng.uniform(*cfg.margin_range))
    top_margin = int(margin * rng.uniform(0.8, 1.3))
    gutter = int(W * rng.uniform(0.03, 0.05)) if ncols > 1 else 0
    col_w = (W - 2 * margin - gutter * (ncols - 1)) // ncols
    size_cap = col_w / (0.55 * cfg.min_chars_per_line)
    body = int(round(min(rng.uniform(*cfg.font_size_range) * cfg.text_scale, size_cap)))
    body = max(body, cfg.min_font_px)
    spacing = rng.uniform(*(cfg.train_line_spacing_range if split == "train" and cfg.train_line_spacing_range
                            else cfg.line_spacing_range))
    justify = rng.random() < cfg.justify_prob
    paper = (int(255 - nrng.integers(0, 12)),) * 3  # grey paper and ink: text-only pages save as 'L'
    ink = (rng.randint(0, 45),) * 3

    f_body = get_font(family, 0, body)
    f_bold = get_font(family, 1, body)
    f_ital = get_font(family, 2, body)
    gap = int(body * rng.uniform(0.7, 1.3))
    if split == "train" and cfg.train_line_spacing_range:  # blocks stay farther apart than the lines in them
        ascent, descent = _metrics(f_body)
        gap = max(gap, math.ceil((ascent + descent) * spacing) - (ascent + descent) + gap // 2)
    bottom = H - top_margin

    placed: list[tuple[_Laid, int, int]] = []  # (laid, x0, y0)
    y = top_margin
    if rng.random() < cfg.page_title_prob:
        size = int(body * rng.uniform(*cfg.title_scale))
        title = src.title()
        laid = None
        while laid is None and size >= cfg.min_font_px:  # shrink until the longest word fits
            laid = _lay_paragraph(title, get_font(head_family, 1, size), W - 2 * margin, ink, 1.15,
                                  False, bottom - y, label="title", md_prefix="# ")
            size = int(size * 0.9)
        if laid is not None:
            centred = rng.random() < 0.4
            dx = (W - 2 * margin - int(_union(laid.ink)[2])) // 2 if centred else 0
            placed.append((laid, margin + max(0, dx), y))
            y += laid.height + int(gap * 1.5)

    labels = [k for k in cfg.block_weights if cfg.block_weights[k] > 0]
    weights = [cfg.block_weights[k] for k in labels]
    n_blocks = rng.randint(*cfg.blocks_range) * ncols  # both columns get content
    col = 0
    col_top = y
    x0 = margin
    attempts = 0
    target = n_blocks + len(placed)  # the page title does not count
    while (len(placed) < target or col < ncols - 1) and attempts < 3 * n_blocks + 20:  # reach the last column
        attempts += 1
        label = rng.choices(labels, weights)[0]
        last = len(placed) + 1 >= target
        if label == "title" and (last or (placed and placed[-1][0].label == "title")):
            label = "text"  # no heading at the end of the page or straight after another
        room = bottom - y
        laid = _make_block(label, src, cfg, rng, col_w, room, body, family, head_family, f_body, f_bold,
                           f_ital, ink, spacing, justify)
        if laid is None:
            if col + 1 < ncols and y > col_top:
                col += 1
                y = col_top
                x0 = margin + col * (col_w + gutter)
                continue
            if room < 3 * body:
                break
            continue
        placed.append((laid, x0, y))
        y += laid.height + gap
    while len(placed) > 1 and placed[-1][0].markdown.startswith("## "):
        placed.pop()  # a section heading with nothing after it

    if not placed:  # a page always has at least one block
        title, size, laid = src.title(), body, None
        while laid is None and size > 4:
            laid = _lay_paragraph(title, get_font(family, 1, size), W - 2 * margin, ink, 1.15, False, None,
                                  "title", "# ")
            size = int(size * 0.9)
        if laid is None:
            raise ValueError(f"page {W}x{H} is too small for any text; check width_range and margin_range")
        placed.append((laid, margin, top_margin))

    image = Image.new("RGB", (W, H), paper)
    draw = ImageDraw.Draw(image)
    blocks: list[SynthBlock] = []
    lines: list[TextPiece] = []
    words: list[TextPiece] = []
    fig_i = 0
    md_parts, gr_parts, txt_parts = [], [], []
    pad = max(2, body // 8)
    for laid, bx, by in placed:
        for op in laid.ops:
            _draw_op(draw, op, bx, by)
        ux1, uy1, ux2, uy2 = _union(laid.ink)
        box_px = (max(0, int(bx + ux1) - pad), max(0, int(by + uy1) - pad),
                  min(W, int(math.ceil(bx + ux2)) + pad), min(H, int(math.ceil(by + uy2)) + pad))
        box = _to_999(box_px, W, H)
        if laid.label == "image":
            md = f"![](images/{fig_i}.jpg)"
            fig_i += 1
            block_md = ""
        else:
            md = block_md = laid.markdown
        blocks.append(SynthBlock(laid.label, box_px, box, block_md, laid.text))
        md_parts.append(md)
        gr_parts.append(f"{format_grounding(laid.label, [box])}\n{block_md}")
        if laid.text:
            txt_parts.append(laid.text)
        lines += [_shift(p, bx, by, W, H) for p in laid.lines]
        words += [_shift(p, bx, by, W, H) for p in laid.words]

    image = _degrade(image, cfg, rng, nrng, paper)
    if tuple(cfg.stretch_range) != (1.0, 1.0):  # 0..999 boxes are relative: only pixel boxes move
        sx = rng.uniform(*cfg.stretch_range)
        W2 = max(1, int(round(W * sx)))
        image = image.resize((W2, H), Image.BICUBIC)
        sx = W2 / W
        blocks = [replace(b, box_px=_scale_x(b.box_px, sx)) for b in blocks]
        lines = [TextPiece(p.text, _scale_x(p.box_px, sx)) for p in lines]
        words = [TextPiece(p.text, _scale_x(p.box_px, sx)) for p in words]
    return SynthPage(
        page_id=page_id(index, seed, split),
        image=image,
        blocks=blocks,
        markdown="\n\n".join(md_parts),
        grounding="\n\n".join(gr_parts),
        plain_text="\n\n".join(txt_parts),
        lines=lines,
        words=words,
        font_family=family,
    )


def _scale_x(box: Sequence[int], sx: float) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return int(math.floor(x1 * sx)), int(y1), int(math.ceil(x2 * sx)), int(y2)


def _shift(p: TextPiece, dx: int, dy: int, w: int, h: int) -> TextPiece:
    x1, y1, x2, y2 = p.box_px
    return TextPiece(p.text, (max(0, int(x1 + dx)), max(0, int(y1 + dy)), min(w, int(math.ceil(x2 + dx))),
                              min(h, int(math.ceil(y2 + dy)))))


def _make_block(label: str, src: TextSource, cfg: SynthConfig, rng: random.Random, col_w: int, room: int,
                body: int, family: str, head_family: str, f_body, f_bold, f_ital, ink, spacing: float,
                justify: bool) -> _Laid | None:
    if room <= 0:
        return None
    if label == "title":  # a section heading; needs room for a few body lines below it
        size = int(body * rng.uniform(1.15, 1.4))
        room -= 3 * int(body * spacing * 1.2)
        if room <= 0:
            return None
        return _lay_paragraph(src.title(), get_font(head_family, 1, size), col_w, ink, 1.15, False, room,
                              label="title", md_prefix="## ")
    if label == "text":
        font = f_ital if rng.random() < 0.08 else f_body
        return _lay_paragraph(src.paragraph(), font, col_w, ink, spacing, justify, room)
    if label == "list":
        n = rng.randint(*cfg.list_items)
        items = []
        for _ in range(n):
            it = src.item()
            if it not in items:
                items.append(it)
        return _lay_list(items, rng.random() < 0.4, f_body, col_w, ink, spacing, room)
    if label == "table":
        ncols = rng.randint(*cfg.table_cols)
        nrows = rng.randint(*cfg.table_rows)
        size = max(cfg.min_font_px, int(body * rng.uniform(0.85, 1.0)))
        font, bold = get_font(family, 0, size), get_font(family, 1, size)
        headers = [src.header() for _ in range(ncols)]
        styles = [rng.randrange(5) for _ in range(ncols)]
        rows = [headers] + [[src.label_cell()] + [src.number_cell(styles[c]) for c in range(1, ncols)]
                            for _ in range(nrows)]
        return _lay_table(rows, font, bold, col_w, ink, rng, room)
    if label == "image":
        return _lay_figure(col_w, rng, room, ink)
    raise ValueError(f"unknown block label {label!r}")


def _draw_op(draw: ImageDraw.ImageDraw, op: _Op, dx: int, dy: int) -> None:
    if op.kind == "text":
        x, y, s, font, fill = op.args
        draw.text((x + dx, y + dy), s, font=font, fill=fill, anchor="ls")
    elif op.kind == "line":
        (x1, y1, x2, y2), fill, width = op.args
        draw.line([x1 + dx, y1 + dy, x2 + dx, y2 + dy], fill=fill, width=width)
    elif op.kind == "rect":
        (x1, y1, x2, y2), fill, width = op.args
        draw.rectangle([x1 + dx, y1 + dy, x2 + dx, y2 + dy], outline=fill, width=width)
    elif op.kind == "figure":
        (x1, y1, x2, y2), kind, seed, ink = op.args
        _draw_figure(draw, (x1 + dx, y1 + dy, x2 + dx, y2 + dy), kind, seed, ink)
    else:
        raise ValueError(f"unknown draw op {op.kind!r}")


def _degrade(image: Image.Image, cfg: SynthConfig, rng: random.Random, nrng: np.random.Generator,
             paper: tuple[int, ...]) -> Image.Image:
    """Mild scan artefacts: slight blur, grey gaussian noise, optional small tilt."""
    if cfg.noise > 0 and rng.random() < cfg.noise_prob:
        if rng.random() < 0.5:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
        sigma = 6.0 * cfg.noise * rng.uniform(0.5, 1.0)
        h, w = image.height, image.width
        noise = np.rint(nrng.standard_normal((h, w, 1), dtype=np.float32) * sigma).astype(np.int16)
        arr = np.asarray(image, dtype=np.int16) + noise
        np.clip(arr, 0, 255, out=arr)
        image = Image.fromarray(arr.astype(np.uint8), "RGB")
    if cfg.rotation_deg > 0:
        angle = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)
        image = image.rotate(angle, resample=Image.BICUBIC, fillcolor=tuple(paper[:3]))
    return image


# ---------------------------------------------------------------------------------- records


def piece_crop_box(size: tuple[int, int], piece: TextPiece) -> tuple[int, int, int, int]:
    """The page-pixel box the crop tasks cut: the ink with a little padding (a quarter of a line's
    height at the sides), less vertically because lines sit close, clipped to the page (``size`` = (W, H))."""
    x1, y1, x2, y2 = piece.box_px
    pad_x = max(2, (piece.line_px or y2 - y1) // 4)
    return max(0, x1 - pad_x), max(0, y1 - 2), min(size[0], x2 + pad_x), min(size[1], y2 + 2)


def piece_crop(image: Image.Image, piece: TextPiece) -> Image.Image:
    """The crop of one piece, as the ``line``/``word``/``block`` tasks show it."""
    return image.crop(piece_crop_box(image.size, piece))


def piece_layout(size: tuple[int, int], piece: TextPiece, crop_scale: str = "crop",
                 key: str = "") -> tuple[tuple[int, int], tuple[int, int]]:
    """(canvas size, where the crop's top-left corner lands on it) of a ``line``/``word``/``block`` sample of
    ``piece`` on a page of ``size`` as ``crop_scale`` shows it (the one place that reads
    :data:`CROP_SCALES`' meaning):

    - ``crop``: the crop alone. It is resized to the view like a page, so its text comes out larger
      than the page's (in ``reading`` pages ~1.7x at the median, up to ~5x).
    - ``page``: where it was, on an otherwise empty canvas of the page's size: the page's text size
      and place, so what a line teaches applies to pages.
    - ``zoom``: on an empty canvas ``z`` times smaller than the page (never smaller than the crop),
      at a place drawn at random; ``z`` is log-uniform between 1 (the page's text size) and the
      crop's own scale. Why: a model that reads crops (large text) does not read the same lines at
      the page's size, and one trained on page-size crops only did not learn to read at all
      (``bench/RESULTS.md``, sessions 17 and 22); every size in between bridges the two.
      ``key`` (the page's id) seeds the draw, so a crop and its glyph targets agree.
    """
    x1, y1, x2, y2 = piece_crop_box(size, piece)
    w, h = x2 - x1, y2 - y1
    if crop_scale == "page":
        return (int(size[0]), int(size[1])), (x1, y1)
    if crop_scale == "zoom":
        rng = random.Random(f"ndocr-zoom/{key}/{x1},{y1},{x2},{y2}")
        z = (max(size) / max(w, h)) ** rng.random()
        cw, ch = max(w, round(size[0] / z)), max(h, round(size[1] / z))
        return (cw, ch), (rng.randint(0, cw - w), rng.randint(0, ch - h))
    return (w, h), (0, 0)


def piece_image(image: Image.Image, piece: TextPiece, crop_scale: str = "crop", key: str = "") -> Image.Image:
    """What a ``line``/``word``/``block`` sample shows of ``piece`` (:func:`piece_layout`). The canvas around
    the crop takes the paper's colour from the page's top rows (the median: degradation noise does
    not tint it)."""
    crop = piece_crop(image, piece)
    canvas_size, offset = piece_layout(image.size, piece, crop_scale, key)
    if canvas_size == crop.size:
        return crop
    top = np.asarray(image)[:4].reshape(-1, len(image.getbands()))
    paper = tuple(int(v) for v in np.median(top, axis=0))
    canvas = Image.new(image.mode, canvas_size, paper if len(paper) > 1 else paper[0])
    canvas.paste(crop, offset)
    return canvas


def crop_record(page: SynthPage, task: str, k: int, text: str, image_rel: str, split: str) -> dict:
    """The manifest record of crop ``k`` (a line or word of ``page``): read with the free prompt."""
    return {"id": f"{page.page_id}-{task}{k:03d}", "image": image_rel, "prompt": PROMPT_FREE, "response": text,
            "task": task, "split": split, "page": page.page_id}


def readable_pieces(pieces: Sequence[TextPiece]) -> list[TextPiece]:
    """Lines or words worth a crop task: those with a letter or digit (not a lone bullet)."""
    return [p for p in pieces if any(ch.isalnum() for ch in p.text)]


def block_lines(page: SynthPage, block: SynthBlock) -> list[TextPiece]:
    """The page's lines whose centre lies in ``block``'s box, top to bottom."""
    x1, y1, x2, y2 = block.box_px
    return sorted((p for p in page.lines
                   if x1 <= (p.box_px[0] + p.box_px[2]) / 2 <= x2 and y1 <= (p.box_px[1] + p.box_px[3]) / 2 <= y2),
                  key=lambda p: p.box_px[1])


def block_pieces(page: SynthPage) -> list[TextPiece]:
    """The page's paragraphs and lists of two lines or more, each as one piece: its plain text (as
    the ``free`` answer has it) over the union of its lines' boxes. Why a ``block`` task: a reader
    trained on single lines loses its place where a paragraph wraps (``bench/RESULTS.md``, session
    27); a block crop teaches the wrap with ~3x a line's answer tokens for the same view
    (``bench/stream_mix.py``)."""
    out = []
    for block in page.blocks:
        if block.label not in BLOCK_LABELS or not any(ch.isalnum() for ch in block.text):
            continue
        inside = [p.box_px for p in block_lines(page, block)]
        if len(inside) < 2:
            continue
        heights = sorted(y2 - y1 for _, y1, _, y2 in inside)
        out.append(TextPiece(block.text, tuple(int(v) for v in _union(inside)), heights[len(heights) // 2]))
    return out


def crop_pieces(page: SynthPage, task: str) -> list[TextPiece]:
    """What a crop task of the stream may show of ``page``: its readable lines or words, or its
    blocks (:func:`block_pieces`); nothing for the page tasks."""
    if task == "block":
        return block_pieces(page)
    if task in ("line", "word"):
        return readable_pieces(page.lines if task == "line" else page.words)
    return []


def save_png(image: Image.Image, path: Path) -> None:
    """PNG, fast compression; pages with no colour are stored single-channel (load with .convert('RGB'))."""
    arr = np.asarray(image)
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
        image = Image.fromarray(np.ascontiguousarray(arr[..., 0]), "L")
    image.save(path, compress_level=1)


def page_records(page: SynthPage, image_rel: str, tasks: Sequence[str], split: str) -> list[dict]:
    """Manifest records for the page-level tasks (``markdown``, ``free``) of one page."""
    boxes = [{"label": b.label, "box": list(b.box)} for b in page.blocks]
    out = []
    for task in tasks:
        if task == "markdown":
            prompt, response = PROMPT_GROUNDING, page.grounding
        elif task == "free":
            prompt, response = PROMPT_FREE, page.plain_text
        else:
            continue
        out.append({"id": f"{page.page_id}-{task}", "image": image_rel, "prompt": prompt, "response": response,
                    "task": task, "split": split, "page": page.page_id, "boxes": boxes})
    return out


def generate(out_dir: str | os.PathLike, n_pages: int, config: SynthConfig | None = None,
             seed: int | None = None, split: str = "train") -> Path:
    """Write ``n_pages`` pages (PNG) and their records; returns the path of ``manifest.jsonl``.

    Images go to ``out_dir/images/``; record ``image`` fields are relative to ``out_dir``.
    The manifest is rewritten, not appended to.
    """
    cfg = config or SynthConfig()
    cfg.validate()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if n_pages < 0:
        raise ValueError(f"n_pages must be >= 0, got {n_pages}")
    seed = cfg.seed if seed is None else seed
    tasks = normalise_tasks(cfg.tasks)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(n_pages):
            page = make_page(i, cfg, seed, split)
            rel = f"images/{page.page_id}.png"
            save_png(page.image, out / rel)
            records = page_records(page, rel, tasks, split)
            crop_rng = random.Random(f"ndocr-crops/{split}/{seed}/{i}")
            if "line" in tasks:
                records += _crop_records(page, out, "line", page.lines, cfg.max_line_crops, crop_rng, split,
                                         cfg.crop_scale)
            if "word" in tasks:
                records += _crop_records(page, out, "word", readable_pieces(page.words), cfg.max_word_crops,
                                         crop_rng, split, cfg.crop_scale)
            if "block" in tasks:
                records += _crop_records(page, out, "block", block_pieces(page), cfg.max_block_crops,
                                         crop_rng, split, cfg.crop_scale)
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(manifest)
    return manifest


def _crop_records(page: SynthPage, out: Path, task: str, pieces: list[TextPiece], limit: int,
                  rng: random.Random, split: str, crop_scale: str = "crop") -> list[dict]:
    chosen = sorted(rng.sample(range(len(pieces)), min(limit, len(pieces))))
    records = []
    for k in chosen:
        rel = f"images/{page.page_id}-{task}{k:03d}.png"
        save_png(piece_image(page.image, pieces[k], crop_scale, page.page_id), out / rel)
        records.append(crop_record(page, task, k, pieces[k].text, rel, split))
    return records


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Records of a manifest with ``image`` resolved to an absolute path."""
    path = Path(path)
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            r["image"] = str((path.parent / r["image"]).resolve())
            records.append(r)
    return records


# ----------------------------------------------------------------------------- text records

_TEXT_TASKS: list[tuple[str, Callable[[str, str], tuple[str, str]]]] = [
    ("repeat", lambda s, t: (f"Repeat after me: {s}", s)),
    ("first_word", lambda s, t: (f"What is the first word of this sentence? {s}", re.sub(r"\W", "", s.split()[0]))),
    ("count", lambda s, t: (f"How many words are in this sentence? {s}", str(len(s.split())))),
    ("upper", lambda s, t: (f"Write this sentence in capital letters: {s}", s.upper())),
    ("first_sentence", lambda s, t: (f"Give the first sentence of this text: {s} {t}", s)),
]


def text_records(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """Toy text-only conversations from the corpus, for stage-2 mixtures (nanochat format)."""
    corpus = load_corpus(split)
    rng = random.Random(f"ndocr-text/{split}/{seed}")
    out = []
    for i in range(n):
        name, fn = _TEXT_TASKS[rng.randrange(len(_TEXT_TASKS))]
        s, t = rng.choice(corpus.sentences), rng.choice(corpus.sentences)
        prompt, answer = fn(s, t)
        out.append({
            "id": f"text-{split}-s{seed}-{i:06d}",
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "task": "text",
        })
    return out


# ---------------------------------------------------------------------------------------- CLI


def synth_main(argv: list[str] | None = None) -> int:
    """``ndocr synth``: write synthetic pages and a manifest."""
    p = argparse.ArgumentParser(prog="ndocr synth", description="Generate synthetic document pages.")
    p.add_argument("--out", default="artifacts/synth", help="output directory (manifest.jsonl, images/)")
    p.add_argument("--pages", type=int, default=16, help="number of pages")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=PROFILES, default="document")
    p.add_argument("--split", choices=list(SPLITS), default="train")
    p.add_argument("--tasks", default=None, help=f"comma list from {','.join(TASKS)} (default: markdown,free)")
    p.add_argument("--text-records", type=int, default=0, help="also write this many text-only records to text.jsonl")
    p.add_argument("--crop-scale", choices=CROP_SCALES, default="crop",
                   help="line/word/block crops alone ('crop'), on an empty page-sized canvas at the page's text size "
                        "('page') or at a size drawn between the two ('zoom')")
    args = p.parse_args(argv)
    overrides: dict[str, Any] = {"seed": args.seed, "crop_scale": args.crop_scale}
    if args.tasks:
        overrides["tasks"] = normalise_tasks(args.tasks)
    try:
        cfg = SynthConfig.from_profile(args.profile, **overrides)
        manifest = generate(args.out, args.pages, cfg, args.seed, args.split)
    except ValueError as e:
        p.error(str(e))
    n = sum(1 for _ in manifest.open(encoding="utf-8"))
    summary = {"manifest": str(manifest), "pages": args.pages, "records": n, "profile": args.profile,
               "split": args.split, "tasks": list(normalise_tasks(cfg.tasks))}
    if args.text_records:
        tpath = Path(args.out) / "text.jsonl"
        with tpath.open("w", encoding="utf-8") as fh:
            for r in text_records(args.text_records, args.seed, args.split):
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        summary["text_records"] = str(tpath)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(synth_main())
