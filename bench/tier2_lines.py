"""Where on a page a tier-2 reading goes wrong (issue 10): CER by visual line.

    python bench/tier2_lines.py --config jobs/configs/speedrun_tier2_pseudo.yaml \\
        --predictions /tmp/run/eval/heldout/model/predictions.jsonl --split heldout

The evaluation's ``line*_cer`` pair the reference's *text* lines (a paragraph is one) by
position. This goes one level down: it draws each evaluated page again from the speedrun's
config (the same profile, overrides and seed give the same page), finds every visual line of
the page in the reference, places one minimal edit script of the reading on the reference
(:func:`pipeline.metrics.edits_per_reference_char`) and reports the CER of the visual lines
grouped by their place in their paragraph (1st, 2nd, 3rd, 4th and later) and on the page. A
model that reads a paragraph's first line and loses it at the wrap shows a jump from row 1 to
row 2; one that cannot read the font shows the same CER in every row. Last, it counts the
readings' word n-grams that the reference lacks but the training split's corpus text holds: a
decoder reciting text it learnt by heart rather than reading the page.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.metrics import edits_per_reference_char  # noqa: E402
from pipeline.synth import load_corpus, make_page  # noqa: E402

ROWS = 4  # the last row holds that place and every later one


def visual_line_errors(page, reference: str, prediction: str) -> list[tuple[int, int, int, int]]:
    """``(place in paragraph, place on page, errors, chars)`` of each visual line of ``page``
    found in ``reference`` (in reading order; a line the reference lacks is skipped)."""
    edits = edits_per_reference_char(prediction, reference)
    out, end, in_paragraph = [], None, 0
    for on_page, piece in enumerate(p for p in page.lines if p.text.strip()):
        text = piece.text.strip()
        at = reference.find(text, end or 0)
        if at < 0:
            continue
        in_paragraph = 0 if end is None or "\n" in reference[end:at] else in_paragraph + 1
        end = at + len(text)
        out.append((in_paragraph, on_page, sum(edits[at:end]), len(text)))
    return out


def word_ngrams(text: str, n: int) -> list[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def recited_ngrams(records: list[dict], n: int) -> tuple[int, int, int]:
    """``(n-grams read, of them in the reference, of the rest in the training split's corpus text)``."""
    corpus = load_corpus("train")
    learnt = set(word_ngrams(" ".join((*corpus.sentences, *corpus.titles, *corpus.items)), n))
    total = in_reference = recited = 0
    for record in records:
        reference = set(word_ngrams(record["reference"], n))
        for gram in word_ngrams(record["prediction"], n):
            total += 1
            in_reference += gram in reference
            recited += gram not in reference and gram in learnt
    return total, in_reference, recited


def table(rows: dict[int, list[int]], title: str) -> list[str]:
    lines = [f"| {title} | lines | chars | CER |", "|---|---:|---:|---:|"]
    for place in sorted(rows):
        errors, chars, count = rows[place]
        name = f"{place + 1}" + ("+" if place == ROWS - 1 else "")
        lines.append(f"| {name} | {count} | {chars} | {errors / chars:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "jobs"))  # after the root: jobs/serve.py not serve/
    import speedrun

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the speedrun YAML that drew the evaluated pages")
    p.add_argument("--predictions", required=True, help="eval/<split>/model/predictions.jsonl")
    p.add_argument("--split", choices=("train", "heldout"), required=True)
    p.add_argument("--task", default="free", help="records of this task only (free: plain text)")
    p.add_argument("--ngram", type=int, default=4, help="words per n-gram in the recitation count")
    args = p.parse_args(argv)

    cfg = speedrun.load_config(args.config)
    synth = cfg.synth_config(tasks=tuple(cfg.tasks))
    records = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("task") == args.task and not r.get("error")]
    if not records:
        raise SystemExit(f"no {args.task!r} records in {args.predictions}")
    by_paragraph: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    by_page: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0])
    for record in records:
        index = int(record["id"].split("-")[2])  # <split>-s<seed>-<index>-<task>
        page = make_page(index, synth, cfg.page_seed(args.split), args.split)
        for in_paragraph, on_page, errors, chars in visual_line_errors(page, record["reference"],
                                                                        record["prediction"]):
            for rows, place in ((by_paragraph, in_paragraph), (by_page, on_page)):
                row = rows[min(place, ROWS - 1)]
                row[0] += errors
                row[1] += chars
                row[2] += 1
    print(f"{len(records)} {args.task!r} readings of {args.split} pages ({args.predictions})\n")
    print("\n".join(table(by_paragraph, "visual line of its paragraph")))
    print()
    print("\n".join(table(by_page, "visual line of the page")))
    total, in_reference, recited = recited_ngrams(records, args.ngram)
    share = (lambda k: f"{k / total:.1%}") if total else (lambda k: "-")
    print(f"\nword {args.ngram}-grams read: {total}; in the reference: {share(in_reference)}; not in the reference "
          f"but in the training split's corpus text: {share(recited)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
