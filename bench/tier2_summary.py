"""Commit-sized record of a tier-2 run (issue 10): its MLflow curves and the evaluation, in one JSON + PNG.

The device's MLflow store does not travel back whole (it holds checkpoints and sample images), so
this keeps what bench/RESULTS.md quotes: the recipe as logged, the curves of the training
metrics, the evaluation summary of the speedrun and, optionally, the peer baseline's metrics.

    python bench/tier2_summary.py --tracking-uri file:///tmp/run/mlruns --run-id 1552... \\
        --eval-summary /tmp/run/eval/summary.json --baseline heldout=/tmp/run/tess/metrics.json \\
        --device "NVIDIA H200" --out bench/tier2/glyphs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import tracking  # noqa: E402
from pipeline.grad_norms import PARTS  # noqa: E402
from pipeline.startup import METRICS as STARTUP  # noqa: E402

CURVES = ("loss", "glyph_cell_loss", "glyph_cell_error", "glyph_patch_loss", "glyph_patch_error", "lr", "grad_norm",
          "grad_norm_max", *(f"grad_norm_{part}" for part in PARTS), *(f"weight_norm_{part}" for part in PARTS),
          "skipped_steps", "slot_rms_mean", "slot_rms_min", "projector_input_absmax", "tokens_per_s", "samples_per_s",
          "flops_per_s", "mfu", "data_wait_s")
RECIPE_PARAMS = ("train.preset", "mode", "train.steps", "train.batch_size", "train.seq_len", "train.optimizer",
                 "train.lr", "train.muon_lr", "train.encoder_lr_scale", "train.warmup_steps", "train.schedule",
                 "train.warmdown_frac", "train.min_lr_frac",
                 "train.step_milestones", "train.glyph_loss", "train.glyph_cell", "train.slot_centering",
                 "train.projector_input_norm", "train.skip_spikes", "train.skip_spikes_patience",
                 "train.synth.profile", "train.synth.overrides.pseudo_word_prob",
                 "train.synth.overrides.word_salad_prob", "train.synth.overrides.train_fonts",
                 "train.synth.overrides.train_line_spacing_range", "train.synth.crop_scale",
                 "train.synth.tasks.line", "train.synth.tasks.block", "train.synth.tasks.free",
                 "train.synth.tasks.markdown", "train.synth.crops_per_page", "train.synth.render_tasks",
                 "train.compile_vision_unit")
EVAL_KEYS = ("cer", "free/cer", "markdown/cer", "plain_cer", "free/line1_cer", "free/line2_cer", "free/line3_cer",
             "free/line4plus_cer", "free/paragraphs_extra", "free/paragraphs_equal", "box_gt_iou70",
             "box_any_gt_iou70", "box_mean_iou", "box_f1", "box_too_many", "box_too_few", "n", "pages_per_s")


def summarise(comparison: tracking.Comparison, uri: str, eval_summary: Path | None, baselines: dict[str, Path],
              device: str, notes: dict) -> dict:
    run = comparison.runs[0]
    run_id = run.run_id
    params = run.params
    history = tracking.metric_histories(comparison, list(CURVES), uri)
    summary: dict = {
        "issue": 10, "date": dt.date.today().isoformat(), "device": device, "run_id": run_id, "run_name": run.name,
        "recipe": {k: params.get(k) for k in RECIPE_PARAMS if k in params} | notes,
        "final": {k: v for k, v in run.metrics.items() if k in CURVES},
        # a stage ended by its time limit (--stage1-end-within) finished here, short of train.steps
        "ended_at_step": int(run.metrics.get("ended_early_at_step", 0)) or None,
        "curves": {m: {int(s): round(v, 4) for s, v in pts.get(run_id, [])} for m, pts in history.items()},
    }
    # each call's seconds before its first step, by phase, keyed by that step (pipeline/startup.py)
    startup = tracking.metric_histories(comparison, list(STARTUP), uri)
    summary["startup"] = {m.removeprefix("startup_").removesuffix("_s"): {int(s): round(v, 1) for s, v in pts[run_id]}
                          for m, pts in startup.items() if pts.get(run_id)}
    if eval_summary:
        evals = json.loads(eval_summary.read_text())
        summary["eval"] = {split: {k: m[k] for k in EVAL_KEYS if k in m} for split, m in evals.items()}
    for split, path in baselines.items():
        metrics = json.loads(path.read_text())
        metrics = metrics.get("tesseract", metrics)
        summary[f"eval_tesseract_{split}"] = {k: metrics[k] for k in EVAL_KEYS if k in metrics}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True, help="the stage-1 run")
    p.add_argument("--eval-summary", type=Path, help="the speedrun's eval/summary.json")
    p.add_argument("--baseline", action="append", default=[], metavar="[SPLIT=]PATH",
                   help="the baseline's metrics.json on a split's records (default split: heldout; repeatable)")
    p.add_argument("--device", required=True)
    p.add_argument("--note", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe facts the params do not hold (e.g. steps=1500 when a resume changed them)")
    p.add_argument("--out", required=True, help="path prefix: writes <out>_run_summary.json and <out>_curves.png")
    args = p.parse_args(argv)
    notes = dict(n.split("=", 1) for n in args.note)
    baselines = {split: Path(path) for split, path in
                 (b.split("=", 1) if "=" in b else ("heldout", b) for b in args.baseline)}
    comparison = tracking.compare_runs(run_ids=[args.run_id], tracking_uri=args.tracking_uri)
    summary = summarise(comparison, args.tracking_uri, args.eval_summary, baselines, args.device, notes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}_run_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    tracking.plot_curves(comparison, f"{out}_curves.png", metrics=list(CURVES), tracking_uri=args.tracking_uri,
                         max_panels=len(CURVES))
    print(f"wrote {out}_run_summary.json and {out}_curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
