"""How far the held-out pages' layout lies from the training pages' (issue 10), and what it costs a reading.

    python bench/layout_shift.py --config jobs/configs/speedrun_tier2_spaced.yaml
    python bench/layout_shift.py --config jobs/configs/speedrun_tier2_zoom_pages.yaml \\
        --predictions /tmp/run/eval/heldout/model/predictions.jsonl --split heldout

Why: a page's line spacing multiplies its font's ascent + descent, and fonts differ there (STIX, the held-out
font, 2.26 cap heights; DejaVu 1.65; Computer Modern 1.42-1.47). So the same spacing setting puts held-out
lines farther apart, relative to their letters, than any training page's, and session 27's model read a
held-out wrap as a paragraph's end (bench/RESULTS.md, session 28). This draws both splits' pages again from the
speedrun's config and prints, per split: the line pitch of text paragraphs in cap heights, and the blank
between a paragraph's line boxes and between blocks (page pixels). With ``--predictions`` of one split it
also splits those pages into thirds by pitch: how many readings have another paragraph count than the
reference (:func:`pipeline.metrics.paragraph_counts`), and their CER.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.metrics import cer, paragraph_counts, strip_grounding  # noqa: E402
from pipeline.synth import block_lines, get_font, make_page  # noqa: E402

SPLITS = ("train", "heldout")


@lru_cache(maxsize=None)
def cap_heights_per_line_box(family: str) -> float:
    """A line box's height (the font's ascent + descent, what spacing multiplies) in cap heights."""
    font = get_font(family, 0, 100)
    ascent, descent = font.getmetrics()
    _, top, _, bottom = font.getbbox("H")
    return (ascent + descent) / (bottom - top)


def paragraph_lines(page) -> list[list[tuple[int, int, int, int]]]:
    """Each text paragraph's line boxes, top to bottom."""
    return [[p.box_px for p in block_lines(page, block)] for block in page.blocks if block.label == "text"]


def pitch_in_cap_heights(page) -> float | None:
    """The median distance between successive lines of the page's paragraphs, in the body font's cap heights
    (None: no paragraph of two lines)."""
    ratio = cap_heights_per_line_box(page.font_family)
    pitches = [(b[1] - a[1]) / (a[3] - a[1]) * ratio
               for lines in paragraph_lines(page) for a, b in zip(lines, lines[1:])]
    return float(np.median(pitches)) if pitches else None


def gaps(page) -> tuple[list[int], list[int]]:
    """(blank pixels between a paragraph's line boxes, between a block's last line box and the next block's
    first), in reading order."""
    rows = [[p.box_px for p in block_lines(page, block)] for block in page.blocks]
    inside = [b[1] - a[3] for block, lines in zip(page.blocks, rows) if block.label == "text"
              for a, b in zip(lines, lines[1:])]
    between = [nxt[0][1] - prev[-1][3] for prev, nxt in zip(rows, rows[1:]) if prev and nxt]
    return inside, between


def percentiles(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    return " / ".join(f"{v:.{digits}f}" for v in np.percentile(values, [5, 50, 95]))


def layout_rows(pages_by_split: dict) -> list[str]:
    lines = ["| pages | n | line pitch in cap heights, 5% / 50% / 95% | blank between a paragraph's lines, px | "
             "blank between blocks, px | pages with a line gap >= a block gap |", "|---|---:|---|---|---|---:|"]
    for split, pages in pages_by_split.items():
        pitches = [p for p in (pitch_in_cap_heights(page) for page in pages) if p is not None]
        inside, between, crossed = [], [], 0
        for page in pages:
            a, b = gaps(page)
            inside += a
            between += b
            crossed += bool(a and b and max(a) >= min(b))
        lines.append(f"| {split} | {len(pages)} | {percentiles(pitches)} | {percentiles(inside, 0)} | "
                     f"{percentiles(between, 0)} | {crossed} |")
    return lines


def reading_rows(records: list[dict], pages: dict[str, object]) -> list[str]:
    """The evaluated pages in thirds by pitch: paragraphs split, CER."""
    scored = []
    for record in records:
        pitch = pitch_in_cap_heights(pages[record["id"]])
        if pitch is None:
            continue
        counts = paragraph_counts(strip_grounding(record["prediction"]), strip_grounding(record["reference"]))
        scored.append((pitch, counts["paragraphs_equal"] == 0.0, cer(record["prediction"], record["reference"])))
    scored.sort()
    lines = ["| pages by line pitch | n | pitch in cap heights | paragraph count wrong | CER |",
             "|---|---:|---|---:|---:|"]
    third = max(1, len(scored) // 3)
    for name, part in (("lowest third", scored[:third]), ("middle third", scored[third:2 * third]),
                       ("highest third", scored[2 * third:])):
        if part:
            lines.append(f"| {name} | {len(part)} | {part[0][0]:.2f}-{part[-1][0]:.2f} | "
                         f"{np.mean([s[1] for s in part]):.0%} | {np.mean([s[2] for s in part]):.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    sys.path.append(str(Path(__file__).resolve().parents[1] / "jobs"))  # after the root: jobs/serve.py not serve/
    import speedrun

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a speedrun YAML (its synth profile, overrides and seed)")
    p.add_argument("--pages", type=int, default=100, help="pages of each split to draw")
    p.add_argument("--predictions", help="eval/<split>/model/predictions.jsonl of a run of this config")
    p.add_argument("--split", choices=SPLITS, help="the split the predictions read")
    p.add_argument("--task", default="free", help="records of this task only")
    args = p.parse_args(argv)
    if bool(args.predictions) != bool(args.split):
        p.error("--predictions and --split go together")
    if args.pages < 1:
        p.error(f"--pages must be >= 1, got {args.pages}")

    cfg = speedrun.load_config(args.config)
    synth = cfg.synth_config()
    pages = {split: [make_page(i, synth, cfg.page_seed(split), split) for i in range(args.pages)] for split in SPLITS}
    print(f"### Page layout by split: {args.config}, {args.pages} pages each (pixels at the page's resolution)\n")
    print("\n".join(layout_rows(pages)))
    if args.predictions:
        records = [json.loads(line) for line in Path(args.predictions).read_text().splitlines() if line.strip()]
        records = [r for r in records if r.get("task") == args.task and not r.get("error")]
        if not records:
            raise SystemExit(f"no {args.task!r} records in {args.predictions}")
        evaluated = {}
        for record in records:
            split, seed, index = record["id"].split("-")[:3]  # <split>-s<seed>-<index>-<task>
            evaluated[record["id"]] = make_page(int(index), synth, int(seed[1:]), split)
        print(f"\n### {len(records)} {args.task!r} readings of {args.split} pages ({args.predictions})\n")
        print("\n".join(reading_rows(records, evaluated)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
