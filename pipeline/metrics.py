"""OCR metrics: edit distances, error rates, Fox-style token overlap, and box IoU / matching.

Definitions follow the public benchmarks so numbers are comparable:

- normalised edit distance (OmniDocBench, Fox): ``lev(pred, gt) / max(len(pred), len(gt))``
  over characters; 0 when both are empty.
- CER / WER: ``lev / len(gt)`` over characters / whitespace-separated words (can exceed 1).
- Fox precision / recall / F1: over the *sets* of word tokens of prediction and reference
  (Fox's ``eval_ocr_test.py`` applies nltk's set precision/recall to ``split()`` tokens; it
  uses jieba for Chinese, which we replace by one token per CJK character).
- boxes: IoU on ``(x1, y1, x2, y2)``; matching pairs a prediction with a ground-truth box of
  the same label (or any label with ``by_label=False``) at IoU >= 0.5.

Levenshtein is Hyyrö's bit-parallel algorithm on Python integers: ``O(len(b))`` big-integer
operations, so whole pages (thousands of characters) score in milliseconds with no native
dependency. Pure Python; no Ray, MLflow or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Sequence

BoxT = Sequence[float]

# ----------------------------------------------------------------------------- edit distance


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Unit-cost edit distance between two sequences (strings, or lists of tokens)."""
    if len(a) < len(b):  # the bit vectors cover the shorter sequence
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[Hashable, int] = {}
    for i, c in enumerate(b):
        peq[c] = peq.get(c, 0) | (1 << i)
    mask = (1 << m) - 1
    last = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for c in a:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # row 0 of the DP grows by one per column
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def normalized_edit_distance(pred: str, gt: str) -> float:
    """``lev / max(len(pred), len(gt))`` (OmniDocBench / Fox); 0.0 when both are empty."""
    n = max(len(pred), len(gt))
    return levenshtein(pred, gt) / n if n else 0.0


def _error_rate(pred: Sequence[Hashable], gt: Sequence[Hashable]) -> float:
    if not gt:
        return 0.0 if not pred else 1.0  # no reference: any output is wholly wrong
    return levenshtein(pred, gt) / len(gt)


def cer(pred: str, gt: str) -> float:
    """Character error rate ``lev(chars) / len(gt)``; 1.0 for output against an empty reference."""
    return _error_rate(pred, gt)


def wer(pred: str, gt: str) -> float:
    """Word error rate over whitespace-separated words; 1.0 for output against an empty reference."""
    return _error_rate(pred.split(), gt.split())


def edits_per_reference_char(pred: str, gt: str) -> list[int]:
    """One minimal edit script of ``pred`` against ``gt``, charged to the reference's characters:
    a substitution or deletion to its own character, an insertion to the character after it (the
    last one at the end). The list sums to ``levenshtein(pred, gt)`` (``gt`` non-empty).

    Why: ``sum(out[i:j]) / (j - i)`` is the CER of any span of the reference, so errors can be
    placed on a page (which visual line, which block) from a single reading. O(len*len) memory:
    meant for pages and their analysis, not for the evaluation's hot path.
    """
    n, m = len(gt), len(pred)
    if not n:
        return []
    rows = [list(range(m + 1))]
    for i in range(1, n + 1):
        prev, row, g = rows[-1], [i] + [0] * m, gt[i - 1]
        for j in range(1, m + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (g != pred[j - 1]))
        rows.append(row)
    out = [0] * n
    i, j = n, m
    while i or j:
        if i and j and rows[i][j] == rows[i - 1][j - 1] + (gt[i - 1] != pred[j - 1]):
            out[i - 1] += gt[i - 1] != pred[j - 1]
            i, j = i - 1, j - 1
        elif i and rows[i][j] == rows[i - 1][j] + 1:
            out[i - 1] += 1
            i -= 1
        else:  # an inserted prediction character: charged to the reference character after it
            out[min(i, n - 1)] += 1
            j -= 1
    return out


# ------------------------------------------------------------------------------ token overlap

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RE = re.compile(f"[{_CJK}]")
_CJK_TOKEN_RE = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def word_tokens(text: str) -> list[str]:
    """Whitespace words; with CJK text, each CJK character is its own token (jieba's stand-in)."""
    if _CJK_RE.search(text):
        return _CJK_TOKEN_RE.findall(text)
    return text.split()


@dataclass(frozen=True)
class OverlapScores:
    precision: float
    recall: float
    f1: float


def fox_scores(pred: str, gt: str) -> OverlapScores:
    """Fox's precision / recall / F1 on the token *sets* of prediction and reference.

    Both empty: 1.0 each (nothing to read, nothing read). One empty: 0.0 each (Fox's nltk
    call returns None there and its averaging fails; 0 is the sensible score).
    """
    hyp, ref = set(word_tokens(pred)), set(word_tokens(gt))
    if not hyp and not ref:
        return OverlapScores(1.0, 1.0, 1.0)
    common = len(hyp & ref)
    p = common / len(hyp) if hyp else 0.0
    r = common / len(ref) if ref else 0.0
    f = 2 * p * r / (p + r) if p and r else 0.0
    return OverlapScores(p, r, f)


def text_scores(pred: str, gt: str, prefix: str = "") -> dict[str, float]:
    """All text metrics of one prediction, keys ``{prefix}edit_distance`` etc."""
    fox = fox_scores(pred, gt)
    return {
        f"{prefix}edit_distance": normalized_edit_distance(pred, gt),
        f"{prefix}cer": cer(pred, gt),
        f"{prefix}wer": wer(pred, gt),
        f"{prefix}precision": fox.precision,
        f"{prefix}recall": fox.recall,
        f"{prefix}f1": fox.f1,
    }


def line_cers(pred: str, gt: str, first: int = 3) -> dict[str, float]:
    """CER of the reference's i-th non-empty line against the prediction's i-th, for the first
    ``first`` lines (``line1_cer``...), and their mean from line ``first + 1`` on (``line4plus_cer``).

    Why: a page read well at the top and badly further down is a model that loses its place, not
    one that cannot read glyphs; pairing lines by position shows where a reading drifts (a line
    the prediction lacks reads against ""). A line skipped or split shifts every later pair, which
    is part of what this is meant to show.
    """
    pred_lines = [ln.strip() for ln in pred.splitlines() if ln.strip()]
    out: dict[str, float] = {}
    late = []
    for i, ref in enumerate(ln.strip() for ln in gt.splitlines() if ln.strip()):
        value = cer(pred_lines[i] if i < len(pred_lines) else "", ref)
        if i < first:
            out[f"line{i + 1}_cer"] = value
        else:
            late.append(value)
    if late:
        out[f"line{first + 1}plus_cer"] = sum(late) / len(late)
    return out


def paragraph_counts(pred: str, gt: str) -> dict[str, float]:
    """How the prediction's paragraphs (blank-line separated) compare with the reference's:
    ``paragraphs_extra`` (the prediction's count less the reference's) and ``paragraphs_equal``.

    Why: a reading that ends a paragraph at every line wrap reads its later lines out of place, and
    the line-pair CERs then blame the glyphs (session 27's model: 71 of 100 held-out readings had
    another paragraph count than the reference, 11 of 100 train-distribution ones; bench/RESULTS.md,
    session 28).
    """
    def count(text: str) -> int:
        return sum(1 for part in re.split(r"\n\s*\n", text) if part.strip())

    extra = count(pred) - count(gt)
    return {"paragraphs_extra": float(extra), "paragraphs_equal": float(extra == 0)}


# --------------------------------------------------------------------------- text cleaning

_HTML_TAG_RE = re.compile(r"<[^>]+>")
_MD_IMAGE_RE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_PREFIX_RE = re.compile(r"^\s*(?:#{1,6}\s+|[-*+\u2022]\s+|\d+[.)]\s+|>\s+)", re.MULTILINE)
_MD_EMPH_RE = re.compile(r"(\*\*|__|\*|`)")


def strip_grounding(text: str) -> str:
    """Markdown without ref/det markup (the reference's cleaning; image boxes become links)."""
    from model.grounding import to_markdown

    return to_markdown(text)


def plain_text(text: str) -> str:
    """Words only: grounding, markdown syntax, HTML tags and image links removed, spaces collapsed.

    Used to compare systems that do not write markdown (e.g. Tesseract) on equal terms.
    """
    md = strip_grounding(text)
    md = _MD_IMAGE_RE.sub(" ", md)
    md = re.sub(r"</t[dh]>", " ", md)
    md = _HTML_TAG_RE.sub(" ", md)
    md = _MD_PREFIX_RE.sub("", md)
    md = _MD_EMPH_RE.sub("", md)
    md = md.replace("|", " ")
    return " ".join(md.split())


# ------------------------------------------------------------------------------------ boxes


def box_iou(a: BoxT, b: BoxT) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 for empty boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0])
    iy = min(a[3], b[3]) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class LabeledBox:
    label: str
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Match:
    pred: int  # index into the predictions
    gt: int  # index into the ground truth
    iou: float


def as_boxes(items: Iterable) -> list[LabeledBox]:
    """LabeledBoxes from ``{"label", "box"}`` dicts, ``(label, box)`` pairs or objects with ``.label``/``.box``."""
    out = []
    for it in items:
        if isinstance(it, LabeledBox):
            out.append(it)
        elif isinstance(it, Mapping):
            out.append(LabeledBox(str(it.get("label", "")), tuple(float(v) for v in it["box"])))
        elif hasattr(it, "label") and hasattr(it, "box"):
            out.append(LabeledBox(str(it.label), tuple(float(v) for v in it.box)))
        else:
            label, box = it
            out.append(LabeledBox(str(label), tuple(float(v) for v in box)))
    return out


def match_boxes(pred: Sequence, gt: Sequence, iou_threshold: float = 0.5, by_label: bool = True,
                method: str = "greedy") -> list[Match]:
    """One-to-one matches between predicted and ground-truth boxes with IoU >= ``iou_threshold``.

    ``greedy`` takes pairs in order of decreasing IoU (ties: lower pred, then gt index);
    ``hungarian`` maximises the summed IoU of above-threshold pairs per label (needs scipy). With ``by_label`` only
    boxes of the same label can match.
    """
    p, g = as_boxes(pred), as_boxes(gt)
    if method not in ("greedy", "hungarian"):
        raise ValueError(f"unknown matching method {method!r}; choose 'greedy' or 'hungarian'")
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for i, b in enumerate(p):
        groups.setdefault(b.label if by_label else "", ([], []))[0].append(i)
    for j, b in enumerate(g):
        groups.setdefault(b.label if by_label else "", ([], []))[1].append(j)
    matches: list[Match] = []
    for pi, gi in groups.values():
        if not pi or not gi:
            continue
        ious = [[box_iou(p[i].box, g[j].box) for j in gi] for i in pi]
        if method == "greedy":
            pairs = sorted(((ious[a][b], a, b) for a in range(len(pi)) for b in range(len(gi))
                            if ious[a][b] >= iou_threshold), key=lambda t: (-t[0], t[1], t[2]))
            used_p, used_g = set(), set()
            for v, a, b in pairs:
                if a in used_p or b in used_g:
                    continue
                used_p.add(a)
                used_g.add(b)
                matches.append(Match(pi[a], gi[b], v))
        else:
            try:
                from scipy.optimize import linear_sum_assignment
            except ImportError as e:  # pragma: no cover - scipy comes with mlflow
                raise ImportError("hungarian box matching needs scipy; use method='greedy'") from e
            import numpy as np

            valid = np.asarray(ious)
            valid[valid < iou_threshold] = 0.0  # pairs below the threshold earn nothing
            cost = -valid
            rows, cols = linear_sum_assignment(cost)
            for a, b in zip(rows, cols):
                if ious[a][b] >= iou_threshold:
                    matches.append(Match(pi[a], gi[b], ious[a][b]))
    return sorted(matches, key=lambda m: (m.gt, m.pred))


def box_scores(pred: Sequence, gt: Sequence, iou_threshold: float = 0.5, good_iou: float = 0.7,
               by_label: bool = True, method: str = "greedy", prefix: str = "box_") -> dict[str, float]:
    """Detection-style scores of one page.

    ``precision``/``recall``/``f1`` count matches at ``iou_threshold``; ``mean_iou`` is over
    matched pairs (0 when none); ``gt_iou70`` is the fraction of ground-truth boxes matched
    with IoU >= ``good_iou``. Pages with no boxes on either side score 1.0 (nothing to find).
    ``too_many``/``too_few`` (1.0 or 0.0; over pages, the share of them) say whether the page has more or
    fewer blocks than the reference: a model that loses its line mid-paragraph starts a new block there.
    """
    p, g = as_boxes(pred), as_boxes(gt)
    matches = match_boxes(p, g, iou_threshold, by_label, method)
    n = len(matches)
    if not p and not g:
        prec = rec = f1 = good = 1.0
    else:
        prec = n / len(p) if p else 0.0
        rec = n / len(g) if g else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec and rec else 0.0
        good = sum(m.iou >= good_iou for m in matches) / len(g) if g else 0.0
    mean_iou = sum(m.iou for m in matches) / n if n else 0.0
    return {
        f"{prefix}precision": prec,
        f"{prefix}recall": rec,
        f"{prefix}f1": f1,
        f"{prefix}mean_iou": mean_iou,
        f"{prefix}gt_iou70": good,
        f"{prefix}n_pred": float(len(p)),
        f"{prefix}n_gt": float(len(g)),
        f"{prefix}matched": float(n),
        f"{prefix}too_many": float(len(p) > len(g)),
        f"{prefix}too_few": float(len(p) < len(g)),
    }


def mean_scores(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Per-key means over rows (a key missing from a row does not count for that row)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}
