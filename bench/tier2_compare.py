"""Tier-2 runs side by side (issue 10), from their committed records (bench/tier2/*_run_summary.json).

Why: a run is judged against earlier ones, and their MLflow stores stay on the device; the records that
``bench/tier2_summary.py`` writes keep the recipe, the curves and the evaluation. This prints the two
tables bench/RESULTS.md quotes: the evaluation of each run (with Tesseract's read of the same held-out
pages), and each training curve's mean over windows of steps, so runs of different lengths compare at
equal steps.

    python bench/tier2_compare.py zoom_2000 zoom_3000 zoom_pages_1400
    python bench/tier2_compare.py bench/tier2/zoom_3000_run_summary.json --windows 0-500,2500-3000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import Table

TIER2 = Path(__file__).resolve().parent / "tier2"
# (column, split, metric): what issue 10's targets and the reading-down-the-page question need
EVAL_COLUMNS = [
    ("held-out `free` CER", "heldout", "free/cer"),
    ("held-out `markdown` CER", "heldout", "markdown/cer"),
    ("held-out blocks IoU >= 0.7", "heldout", "box_gt_iou70"),
    ("held-out `free` line 1 / 4+ CER", "heldout", ("free/line1_cer", "free/line4plus_cer")),
    ("held-out `free` paragraph count right", "heldout", "free/paragraphs_equal"),
    ("held-out lines alone", "heldout_lines", "cer"),
    ("held-out lines on the page", "heldout_lines_on_page", "cer"),
    ("train-dist. `free` CER", "train", "free/cer"),
    ("train-dist. blocks IoU >= 0.7", "train", "box_gt_iou70"),
]
CURVES = ["loss", "glyph_cell_error", "glyph_patch_error", "lr", "tokens_per_s"]
WINDOWS = "200-400,500-700,900-1100,1200-1400,1800-2000,2800-3000"


def load(run: str) -> tuple[str, dict]:
    """A record by path, or by its name under bench/tier2 (``zoom_3000``)."""
    path = Path(run)
    if not path.exists():
        path = TIER2 / f"{run}_run_summary.json"
    if not path.exists():
        raise SystemExit(f"no run record {run!r} (a path, or a name under {TIER2})")
    return path.name.removesuffix("_run_summary.json"), json.loads(path.read_text())


def _value(scores: dict, split: str, metric) -> str:
    metrics = metric if isinstance(metric, tuple) else (metric,)
    found = [scores.get(split, {}).get(m) for m in metrics]
    if any(v is None for v in found):
        return "-"
    return " / ".join(f"{v:.1%}" if m.startswith("box_") or m.endswith("_equal") else f"{v:.3f}"
                      for m, v in zip(metrics, found))


def _mix(recipe: dict) -> str:
    prefix = "train.synth.tasks."
    return ", ".join(f"{k[len(prefix):]} {float(v):g}" for k, v in recipe.items() if k.startswith(prefix)) or "-"


def _steps(record: dict) -> str:
    """The steps a run trained: ``2576 of 3000`` where its time limit ended the stage early."""
    steps = record.get("recipe", {}).get("train.steps", "-")
    return f"{record['ended_at_step']} of {steps}" if record.get("ended_at_step") else str(steps)


def eval_table(runs: list[tuple[str, dict]]) -> Table:
    rows = []
    for name, record in runs:
        recipe = record.get("recipe", {})
        rows.append([name, _steps(record), _mix(recipe)]
                    + [_value(record.get("eval", {}), split, metric) for _, split, metric in EVAL_COLUMNS])
    peer = next((r for _, r in runs if r.get("eval_tesseract_heldout")), None)
    if peer:
        scores = {"heldout": peer["eval_tesseract_heldout"], "heldout_lines": peer.get("eval_tesseract_heldout_lines", {})}
        rows.append(["Tesseract (same held-out pages)", "-", "-"]
                    + [_value(scores, split, metric) for _, split, metric in EVAL_COLUMNS])
    return Table("Tier-2 runs: evaluation (bench/tier2_compare.py)",
                 ["run", "steps", "stream tasks"] + [c for c, _, _ in EVAL_COLUMNS], rows, [])


def parse_windows(text: str) -> list[tuple[int, int]]:
    windows = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
            raise SystemExit(f"--windows: {part!r} is not FIRST-LAST (steps, e.g. 200-400)")
        windows.append((int(lo), int(hi)))
    return windows


def curve_table(runs: list[tuple[str, dict]], metrics: list[str], windows: list[tuple[int, int]]) -> Table:
    rows = []
    for metric in metrics:
        for name, record in runs:
            curve = {int(step): v for step, v in record.get("curves", {}).get(metric, {}).items()}
            if not curve:
                continue
            means = []
            for lo, hi in windows:
                inside = [v for step, v in curve.items() if lo <= step <= hi]
                means.append(sum(inside) / len(inside) if inside else "-")
            rows.append([metric, name] + means)
    return Table("Tier-2 runs: training curves, mean over windows of steps (bench/tier2_compare.py)",
                 ["metric", "run"] + [f"{lo}-{hi}" for lo, hi in windows], rows,
                 ["'-': the run logged no step in that window"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run records: paths, or names under bench/tier2")
    p.add_argument("--curves", default=",".join(CURVES), help="training metrics to average (comma-separated)")
    p.add_argument("--windows", default=WINDOWS, help="step windows FIRST-LAST, comma-separated")
    args = p.parse_args()
    runs = [load(r) for r in args.runs]
    for table in (eval_table(runs), curve_table(runs, [m for m in args.curves.split(",") if m],
                                                parse_windows(args.windows))):
        print(f"### {table.title}\n\n{table.markdown()}\n" + "".join(f"\n- {n}" for n in table.notes) + "\n")


if __name__ == "__main__":
    main()
