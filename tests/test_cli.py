"""The ``ndocr`` command line: info, tokens, ocr, synth."""

from __future__ import annotations

import json

from pipeline.cli import main


def test_info_full_counts_match_the_reference(capsys):
    assert main(["info", "--preset", "full", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["gpt"] == 560_988_160
    assert params["projector"] == 2048 * 1280 + 1280
    assert 300e6 < params["clip"] < 306e6 and 94e6 < params["sam+compressor"] < 98e6


def test_tokens_prints_the_reference_schedule(capsys):
    assert main(["tokens", "1191x1684", "--mode", "gundam"]) == 0
    assert json.loads(capsys.readouterr().out) == {"mode": "gundam", "crop": [2, 3], "image_tokens": 903, "views": 7}
    assert main(["tokens", "1280x1280", "--max-crops", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["image_tokens"] == 693


def test_tokens_bad_input_is_a_clear_error(capsys):
    assert main(["tokens", "no-such-file.png"]) == 2
    assert "ndocr tokens: error" in capsys.readouterr().err


def test_synth_then_ocr_writes_the_reference_outputs(tmp_path, tiny_checkpoint, capsys):
    assert main(["synth", "--out", str(tmp_path / "pages"), "--pages", "2", "--profile", "easy"]) == 0
    pages = sorted((tmp_path / "pages" / "images").glob("*.png"))
    assert len(pages) == 2
    out = tmp_path / "ocr"
    assert main(["ocr", *map(str, pages), "--checkpoint", str(tiny_checkpoint), "--max-tokens", "8",
                 "--out", str(out)]) == 0
    for page in pages:
        assert (out / page.stem / "result.mmd").is_file()
        assert (out / page.stem / "result_with_boxes.jpg").is_file()
