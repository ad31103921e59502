"""Evaluate a checkpoint (and/or the Tesseract baseline) on an eval set; results go to MLflow.

    python jobs/evaluate.py --checkpoint artifacts/stage2/final --data artifacts/synth_eval/manifest.jsonl
    python jobs/evaluate.py --checkpoint CKPT --synth 16 --baseline tesseract      # held-out synthetic pages
    python jobs/evaluate.py --checkpoint CKPT --data Fox/en_page_ocr.json --image-dir Fox/en_pdf_png
    python jobs/evaluate.py --checkpoint CKPT --data OmniDocBench/OmniDocBench.json --limit 100
    ray job submit --working-dir . -- python jobs/evaluate.py --checkpoint /shared/ckpt --data ... --num-actors 4 --use-gpu

``--data`` may be a JSONL eval manifest (synth format), a Fox page-OCR JSON or
OmniDocBench.json (detected from the content). Inference runs as Ray Data batch inference
with an actor pool holding the model (one GPU per actor with ``--use-gpu``). With
``--baseline tesseract`` both systems run on the same pages and a side-by-side table
(accuracy and pages/s) is printed and logged; the baseline needs ``tesseract`` on PATH
(``apt-get install -y tesseract-ocr``) and is skipped with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

try:
    import _common  # noqa: F401  (run as a script: puts the repo root on sys.path)
    from _common import init_ray
except ImportError:  # imported as jobs.evaluate
    from jobs._common import init_ray


def build_parser() -> argparse.ArgumentParser:
    from pipeline.synth import PROFILES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="eval manifest (.jsonl), Fox page-OCR .json or OmniDocBench.json")
    p.add_argument("--synth", type=int, default=0, metavar="N",
                   help="no --data: generate N held-out synthetic pages (easy profile) and evaluate them")
    p.add_argument("--synth-profile", default="easy", choices=PROFILES)
    p.add_argument("--image-dir", help="image folder of a Fox / OmniDocBench set")
    p.add_argument("--checkpoint", help="checkpoint directory (model.safetensors, config.json, tokenizer.json)")
    p.add_argument("--baseline", choices=["tesseract"], help="also evaluate a peer baseline on the same pages")
    p.add_argument("--tasks", help="comma list of tasks to keep (e.g. markdown,free)")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-actors", type=int, default=1, help="actors in the inference pool (each loads the model)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--tesseract-lang", default="eng")
    p.add_argument("--experiment", default="nano-deepseek-ocr-eval")
    p.add_argument("--run-name")
    p.add_argument("--parent-run-id")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or sqlite:///artifacts/mlflow.db")
    p.add_argument("--no-mlflow", action="store_true", help="write results to --out only")
    p.add_argument("--out", default="artifacts/eval", help="predictions, metrics, rendered pages")
    p.add_argument("--n-render", type=int, default=3, help="pages drawn with their boxes")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local in-process Ray)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.baseline:
        parser.error("pass --checkpoint and/or --baseline tesseract")
    data = args.data
    if not data:
        if not args.synth:
            parser.error("pass --data FILE or --synth N")
        from pipeline.synth import SynthConfig, generate

        cfg = SynthConfig.from_profile(args.synth_profile)
        data = str(generate(Path(args.out) / "synth", args.synth, cfg, seed=cfg.seed, split="heldout"))
    from pipeline.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(
        data=data, checkpoint=args.checkpoint, baseline=args.baseline, image_dir=args.image_dir,
        tasks=tuple(t for t in args.tasks.split(",") if t) if args.tasks else None, limit=args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, num_actors=args.num_actors,
        use_gpu=args.use_gpu, tesseract_lang=args.tesseract_lang, experiment=args.experiment,
        run_name=args.run_name, parent_run_id=args.parent_run_id, tracking_uri=args.tracking_uri,
        log_mlflow=not args.no_mlflow, out_dir=args.out, n_render=args.n_render,
    )
    init_ray(args.address)
    report = evaluate(cfg, progress=print)
    for system, why in report.skipped.items():
        print(f"SKIPPED {system}: {why}")
    if report.results:
        print(report.table())
    print(json.dumps({
        "data": data,
        "parent_run_id": report.parent_run_id,
        "runs": {s: r.run_id for s, r in report.results.items()},
        "metrics": {s: {k: r.metrics[k] for k in ("n", "edit_distance", "f1", "pages_per_s") if k in r.metrics}
                    for s, r in report.results.items()},
        "skipped": report.skipped,
        "out": str(Path(args.out).resolve()),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
