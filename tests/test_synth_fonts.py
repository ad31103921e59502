"""Font families: each draws every character of the pages' words with its own glyph of that name,
and what a family has no glyph for (Computer Modern's bullet) comes from the fallback family."""

from __future__ import annotations

import pytest
from fontTools import agl
from fontTools.ttLib import TTFont

from pipeline import synth
from pipeline.synth import (
    BULLET,
    CorpusSplit,
    FONT_FAMILIES,
    GLYPH_FALLBACK_FAMILY,
    SynthConfig,
    font_dir,
    font_has_glyph,
    get_font,
    glyph_font,
    load_corpus,
    make_page,
    missing_font_files,
)

CM_FAMILIES = ("cm_roman", "cm_sans", "cm_typewriter")
# a glyph that reads as another character: TeX's fonts set the apostrophe as a right quote
READS_AS = {"\u2019": "'"}
pytestmark = pytest.mark.skipif(font_dir() is None, reason="no font directory (matplotlib's fonts/ttf or "
                                                           "$NDOCR_FONT_DIR)")
SALAD_CHARACTERS = set("0123456789.,%-ABCDEFGHJKLMNPRSTUVWXYZ!?;:")  # word salad's numbers, codes, punctuation


def _page_characters() -> tuple[set[str], set[str]]:
    """(characters of the words, characters drawn beside them: list markers): every corpus line,
    word salad's characters, and pages of every profile and split."""
    words, plain = set(SALAD_CHARACTERS), set()
    for split in ("train", "heldout"):
        corpus = load_corpus(split)
        for name in CorpusSplit.__dataclass_fields__:
            words.update(c for line in getattr(corpus, name) for c in line if not c.isspace())
    for profile in ("document", "reading", "easy"):
        cfg = SynthConfig.from_profile(profile, pseudo_word_prob=0.3, noise=0.0,
                                       block_weights={"text": 0.3, "title": 0.1, "list": 0.3, "table": 0.3})
        for split in ("train", "heldout"):
            for i in range(8):
                page = make_page(i, cfg, seed=3, split=split)
                words.update(c for w in page.words for c in w.text)
                plain.update(c for c in page.plain_text if not c.isspace())
    return words, plain - words


@pytest.fixture(scope="module")
def page_characters() -> tuple[set[str], set[str]]:
    return _page_characters()


@pytest.mark.parametrize("family", sorted(FONT_FAMILIES))
def test_family_draws_the_words_characters_by_name(family, page_characters):
    word_chars, marker_chars = page_characters
    assert set("Aa0.,%-") <= word_chars and BULLET in marker_chars
    for style, name in enumerate(FONT_FAMILIES[family]):
        path = font_dir() / name
        cmap = TTFont(str(path)).getBestCmap()
        wrong = {}
        for c in sorted(word_chars):
            glyph = cmap.get(ord(c))
            drawn = agl.toUnicode(glyph) if glyph else None
            if READS_AS.get(drawn, drawn) != c:
                wrong[c] = glyph
        assert not wrong, (family, name, wrong)  # e.g. OT1's '<' is an inverted '!'
        font = get_font(family, style, 24)
        for c in marker_chars:  # markers may come from the fallback, never as a .notdef box
            assert font_has_glyph(glyph_font(font, c).path, c), (family, name, c)


def test_computer_modern_bullets_come_from_the_fallback_family():
    sans = get_font(GLYPH_FALLBACK_FAMILY, 0, 30)
    assert font_has_glyph(sans.path, BULLET) and glyph_font(sans, BULLET) is sans
    for family in CM_FAMILIES:
        font = get_font(family, 0, 30)
        assert font_has_glyph(font.path, "a") and not font_has_glyph(font.path, BULLET)
        assert glyph_font(font, "word") is font
        fallback = glyph_font(font, BULLET)
        assert fallback.path == sans.path and fallback.size == 30


def test_computer_modern_trains_and_leaves_the_heldout_pages_alone():
    plain = SynthConfig.reading()
    wider = SynthConfig.reading(train_fonts=("sans", "serif", "mono", *CM_FAMILIES))
    families = {make_page(i, wider, 0, "train").font_family for i in range(24)}
    assert families & set(CM_FAMILIES) and families <= set(wider.train_fonts)
    for i in range(3):  # the held-out pages draw their own fonts: the evaluation pages stay the same
        assert make_page(i, wider, 1, "heldout").image.tobytes() == make_page(i, plain, 1, "heldout").image.tobytes()


def test_a_font_folder_without_a_familys_file_is_an_error(tmp_path, monkeypatch):
    for name in FONT_FAMILIES["sans"]:
        (tmp_path / name).write_bytes((font_dir() / name).read_bytes())
    assert "cmr10.ttf" in missing_font_files(tmp_path) and "DejaVuSans.ttf" not in missing_font_files(tmp_path)
    assert missing_font_files() == []  # the folder the tests draw with has every family
    get_font.cache_clear()
    monkeypatch.setattr(synth, "font_dir", lambda: tmp_path)
    try:
        assert get_font("sans", 0, 20).path == str(tmp_path / "DejaVuSans.ttf")
        with pytest.raises(FileNotFoundError, match=r"'cm_roman' needs cmr10.ttf in .*missing: \["):
            get_font("cm_roman", 0, 20)
    finally:
        get_font.cache_clear()
