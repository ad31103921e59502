"""Metrics on known strings and boxes (exact values), plus Levenshtein against a plain DP oracle."""

from __future__ import annotations

import random

import pytest

from pipeline import metrics as M


def _dp_levenshtein(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
        prev = cur
    return prev[-1]


@pytest.mark.parametrize("a,b,d", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3), ("", "", 0),
    ("same", "same", 0), ("abc", "cba", 2), ("ünï", "uni", 2),
])
def test_levenshtein_known_values(a, b, d):
    assert M.levenshtein(a, b) == d
    assert M.levenshtein(b, a) == d


def test_levenshtein_on_tokens_and_against_dp():
    assert M.levenshtein(["the", "cat"], ["the", "big", "cat"]) == 1
    rng = random.Random(0)
    for _ in range(400):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 140)))  # spans several 64-bit words
        assert M.levenshtein(a, b) == _dp_levenshtein(a, b), (a, b)


def test_edit_distance_and_error_rates():
    assert M.normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert M.normalized_edit_distance("", "") == 0.0
    assert M.normalized_edit_distance("", "abc") == 1.0
    assert M.cer("kitten", "sitting") == pytest.approx(3 / 7)  # over len(gt) = 7
    assert M.cer("sitting", "kitten") == pytest.approx(3 / 6)
    assert M.cer("abcdef", "abc") == pytest.approx(1.0)  # insertions can push CER to/above 1
    assert M.cer("x", "") == 1.0 and M.cer("", "") == 0.0
    assert M.wer("the cat sat", "the cat sat down") == pytest.approx(1 / 4)
    assert M.wer("a x c", "a b c") == pytest.approx(1 / 3)


def test_edits_per_reference_char_place_a_minimal_script_on_the_reference():
    assert M.edits_per_reference_char("abc", "abc") == [0, 0, 0]
    assert M.edits_per_reference_char("axc", "abc") == [0, 1, 0]  # substitution: its own character
    assert M.edits_per_reference_char("ac", "abc") == [0, 1, 0]  # deletion: its own character
    assert M.edits_per_reference_char("abxc", "abc") == [0, 0, 1]  # insertion: the character after it
    assert M.edits_per_reference_char("abcxy", "abc") == [0, 0, 2]  # at the end: the last one
    assert M.edits_per_reference_char("", "ab") == [1, 1] and M.edits_per_reference_char("x", "") == []
    rng = random.Random(3)
    for _ in range(200):
        gt = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 12)))
        pred = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 12)))
        edits = M.edits_per_reference_char(pred, gt)
        assert len(edits) == len(gt) and sum(edits) == M.levenshtein(pred, gt), (pred, gt)


def test_line_cers_pair_lines_by_position():
    gt = "alpha beta\n\nsecond line\nthird\nfour\nfive five"
    pred = "alpha beta\nsecond lime\n  third  \nfour"  # blank lines and edge spaces do not count
    scores = M.line_cers(pred, gt)
    assert scores == pytest.approx({"line1_cer": 0.0, "line2_cer": 1 / 11, "line3_cer": 0.0,
                                    "line4plus_cer": (0.0 + 1.0) / 2})  # line 5 is missing: CER 1
    assert M.line_cers("one", "one") == {"line1_cer": 0.0}  # a single line (a crop) has no later lines
    assert M.line_cers("x", "") == {}
    # a drifted reading: right at the top, its own text further down
    drifted = M.line_cers("the first line\nthe second line\nsomething else\nnothing like it",
                          "the first line\nthe second line\nthe third line\nthe fourth line")
    assert drifted["line1_cer"] == drifted["line2_cer"] == 0.0 < drifted["line3_cer"] <= drifted["line4plus_cer"]


def test_paragraph_counts_see_a_paragraph_split_at_its_wraps():
    gt = "Title\n\nA paragraph that wraps over two lines of the page.\n\n\u2022 one\n\u2022 two"
    assert M.paragraph_counts(gt, gt) == {"paragraphs_extra": 0.0, "paragraphs_equal": 1.0}
    split = "Title\n\nA paragraph that wraps\n\nover two lines of the page.\n \n\u2022 one\n\u2022 two"
    assert M.paragraph_counts(split, gt) == {"paragraphs_extra": 1.0, "paragraphs_equal": 0.0}
    assert M.paragraph_counts("Title\n\n\n", gt)["paragraphs_extra"] == -2.0  # stopped after the title
    assert M.paragraph_counts("", "") == {"paragraphs_extra": 0.0, "paragraphs_equal": 1.0}


def test_fox_token_set_scores():
    s = M.fox_scores("the cat the dog", "the cat sat")  # sets {the,cat,dog} vs {the,cat,sat}
    assert (s.precision, s.recall, s.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    s = M.fox_scores("a b", "a b c d")
    assert (s.precision, s.recall, s.f1) == pytest.approx((1.0, 0.5, 2 / 3))
    assert M.fox_scores("", "") == M.OverlapScores(1.0, 1.0, 1.0)
    assert M.fox_scores("", "a") == M.OverlapScores(0.0, 0.0, 0.0)
    assert M.word_tokens("我爱 OCR 模型") == ["我", "爱", "OCR", "模", "型"]
    scores = M.text_scores("kitten", "sitting", prefix="p_")
    assert set(scores) == {"p_edit_distance", "p_cer", "p_wer", "p_precision", "p_recall", "p_f1"}
    assert scores["p_wer"] == 1.0 and scores["p_f1"] == 0.0


def test_grounding_and_markdown_are_stripped():
    text = ("<|ref|>title<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n# Hi\n\n"
            "<|ref|>table<|/ref|><|det|>[[5, 6, 7, 8]]<|/det|>\n<table><tr><td>a</td><td>b</td></tr></table>\n\n"
            "<|ref|>list<|/ref|><|det|>[[5, 6, 7, 9]]<|/det|>\n- one **two**\n1. three")
    assert M.strip_grounding(text) == ("# Hi\n\n<table><tr><td>a</td><td>b</td></tr></table>\n\n"
                                       "- one **two**\n1. three")
    assert M.plain_text(text) == "Hi a b one two three"
    assert M.plain_text("Tesseract  says\nHi") == "Tesseract says Hi"


def test_box_iou():
    assert M.box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert M.box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)
    assert M.box_iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching
    assert M.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert M.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_matching_respects_labels_and_threshold():
    gt = [("title", [0, 0, 100, 100]), ("text", [0, 200, 100, 300])]
    pred = [("text", [0, 0, 100, 100]), ("text", [0, 200, 100, 260])]  # wrong label; IoU 0.6
    assert [(m.pred, m.gt) for m in M.match_boxes(pred, gt)] == [(1, 1)]
    assert [(m.pred, m.gt) for m in M.match_boxes(pred, gt, by_label=False)] == [(0, 0), (1, 1)]
    assert M.match_boxes(pred, gt, iou_threshold=0.7) == []


def test_greedy_and_hungarian_matching_differ_where_they_should():
    # P0 overlaps G0 best (0.9) but also G1 (0.64); P1 only reaches G0 (0.6).
    gt = [("t", [0, 0, 10, 10]), ("t", [2, 0, 11, 10])]
    pred = [("t", [0, 0, 9, 10]), ("t", [0, 0, 6, 10])]
    greedy = M.match_boxes(pred, gt, method="greedy")
    assert [(m.pred, m.gt) for m in greedy] == [(0, 0)]
    assert greedy[0].iou == pytest.approx(0.9)
    hung = M.match_boxes(pred, gt, method="hungarian")
    assert [(m.pred, m.gt) for m in hung] == [(1, 0), (0, 1)]
    assert sum(m.iou for m in hung) == pytest.approx(0.6 + 7 / 11)
    with pytest.raises(ValueError, match="unknown matching method"):
        M.match_boxes(pred, gt, method="nope")


def test_box_scores_exact():
    gt = [{"label": "title", "box": [0, 0, 100, 100]}, {"label": "text", "box": [0, 200, 100, 300]},
          {"label": "list", "box": [0, 400, 100, 500]}]
    pred = [{"label": "title", "box": [0, 0, 100, 100]}, {"label": "text", "box": [0, 200, 100, 260]}]
    s = M.box_scores(pred, gt)
    assert s["box_precision"] == 1.0
    assert s["box_recall"] == pytest.approx(2 / 3)
    assert s["box_f1"] == pytest.approx(0.8)
    assert s["box_mean_iou"] == pytest.approx(0.8)  # (1.0 + 0.6) / 2
    assert s["box_gt_iou70"] == pytest.approx(1 / 3)  # only the title reaches 0.7
    assert (s["box_n_pred"], s["box_n_gt"], s["box_matched"]) == (2.0, 3.0, 2.0)
    assert (s["box_too_many"], s["box_too_few"]) == (0.0, 1.0)
    split = M.box_scores(pred + [{"label": "text", "box": [0, 270, 100, 300]}] * 2, gt)  # text in 3 pieces, no list
    assert (split["box_too_many"], split["box_too_few"]) == (1.0, 0.0)
    assert (M.box_scores(gt, gt)["box_too_many"], M.box_scores(gt, gt)["box_too_few"]) == (0.0, 0.0)
    assert M.box_scores([], [])["box_f1"] == 1.0
    none = M.box_scores([], gt)
    assert none["box_f1"] == 0.0 and none["box_mean_iou"] == 0.0


def test_mean_scores_skips_missing_keys():
    assert M.mean_scores([{"a": 1.0, "b": 2.0}, {"a": 3.0}]) == {"a": 2.0, "b": 2.0}
