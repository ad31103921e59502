"""Read the fixed test images with a checkpoint: EXPECTED vs GENERATED and a similarity per image.

    python jobs/vision_sample.py --checkpoint artifacts/stage1/final
    python jobs/vision_sample.py --checkpoint CKPT --limit 3 --max-new-tokens 256 --json out.json
    python jobs/vision_sample.py --regenerate            # rebuild data/test_images from pipeline/synth.py

The images in ``data/test_images/`` are synthetic pages (and one text-line crop) made by
``pipeline/synth.py`` from the held-out split, committed with ``expected.json`` so every run,
on any machine, reads the very same pixels. Similarity is ``1 - normalised edit distance``
between the generated and expected text after grounding markup is removed (1.0 = exact).
Runs in-process (no Ray): it is the quick look a training job takes after each stage.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

try:
    import _common  # noqa: F401  (run as a script: puts the repo root on sys.path)
    from _common import REPO_ROOT
except ImportError:  # imported as jobs.vision_sample
    from jobs._common import REPO_ROOT

TEST_IMAGES = REPO_ROOT / "data" / "test_images"
EXPECTED_FILE = "expected.json"

# (profile, seed, split, page index, task, file name, config overrides): what data/test_images holds.
TEST_IMAGE_SPECS: list[tuple[str, int, str, int, str, str, dict[str, Any]]] = [
    ("easy", 101, "heldout", 0, "markdown", "easy_00_markdown.png", {}),
    ("easy", 101, "heldout", 1, "free", "easy_01_free.png", {}),
    ("easy", 102, "heldout", 0, "markdown", "easy_02_markdown.png", {}),
    ("easy", 102, "heldout", 1, "free", "easy_03_free.png", {}),
    ("easy", 103, "heldout", 0, "markdown", "easy_04_markdown.png", {}),
    ("easy", 103, "heldout", 1, "markdown", "easy_05_markdown.png", {}),
    ("document", 201, "heldout", 0, "markdown", "doc_00_markdown.png", {"width_range": (640, 768)}),
    ("document", 202, "heldout", 0, "free", "doc_01_free.png", {"width_range": (640, 768)}),
    ("document", 203, "heldout", 0, "line", "doc_02_line.png", {"width_range": (640, 768)}),
]


def make_test_images(out_dir: str | Path = TEST_IMAGES) -> Path:
    """Regenerate the fixed images and ``expected.json`` (deterministic for a Pillow/FreeType build)."""
    from PIL import Image

    from pipeline.synth import SynthConfig, generate, read_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for profile, seed, split, index, task, name, overrides in TEST_IMAGE_SPECS:
            tasks = ("line",) if task == "line" else ("markdown", "free")
            cfg = SynthConfig.from_profile(profile, noise=0.0, tasks=tasks, seed=seed, **overrides)
            manifest = generate(Path(tmp) / f"{profile}-{seed}", index + 1, cfg, seed=seed, split=split)
            records = [r for r in read_manifest(manifest) if r["task"] == task]
            page_ids = sorted({r["page"] for r in records})
            record = next(r for r in records if r["page"] == page_ids[index])
            with Image.open(record["image"]) as im:
                im.load()
                im.save(out / name, optimize=True)  # smaller than synth's fast PNGs; same pixels
            entries.append({
                "file": name, "task": task, "prompt": record["prompt"], "expected": record["response"],
                "boxes": record.get("boxes", []),
                "source": {"generator": "pipeline.synth", "profile": profile, "seed": seed, "split": split,
                           "page_index": index, "record_id": record["id"], "overrides": overrides},
            })
    doc = {"about": "Fixed evaluation images made by pipeline/synth.py; regenerate with "
                    "`python jobs/vision_sample.py --regenerate`.", "images": entries}
    path = out / EXPECTED_FILE
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_expected(images_dir: str | Path = TEST_IMAGES) -> list[dict]:
    """Entries of ``expected.json`` with ``path`` set to each image's absolute path."""
    d = Path(images_dir)
    path = d / EXPECTED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `python jobs/vision_sample.py --regenerate`")
    entries = json.loads(path.read_text(encoding="utf-8"))["images"]
    for e in entries:
        e["path"] = str((d / e["file"]).resolve())
        if not Path(e["path"]).is_file():
            raise FileNotFoundError(f"{e['path']} (listed in {path}) is missing")
    return entries


def similarity(generated: str, expected: str) -> float:
    """1 - normalised edit distance of the texts with grounding markup removed."""
    from pipeline.metrics import normalized_edit_distance, strip_grounding

    return 1.0 - normalized_edit_distance(strip_grounding(generated), strip_grounding(expected))


def run_samples(checkpoint: str | Path, images_dir: str | Path = TEST_IMAGES, max_new_tokens: int = 512,
                limit: int | None = None, use_gpu: bool = False) -> list[dict]:
    """``[{file, task, expected, generated, similarity, finish_reason}]`` for the fixed images."""
    from pipeline.evaluate import predict_images

    entries = load_expected(images_dir)[:limit]
    preds = predict_images(checkpoint, [e["path"] for e in entries], [e["prompt"] for e in entries],
                           max_new_tokens=max_new_tokens, use_gpu=use_gpu)
    out = []
    for e, p in zip(entries, preds):
        gen = p["prediction"]
        out.append({"file": e["file"], "task": e["task"], "expected": e["expected"], "generated": gen,
                    "similarity": similarity(gen, e["expected"]), "finish_reason": p["finish_reason"],
                    "error": p["error"]})
    return out


def format_samples(samples: list[dict]) -> str:
    lines = []
    for i, s in enumerate(samples, 1):
        lines += [f"=== [{i}/{len(samples)}] {s['file']} ({s['task']}) ===", "EXPECTED:", s["expected"],
                  "GENERATED:", s["generated"] if not s["error"] else f"<error: {s['error']}>",
                  f"similarity: {s['similarity']:.3f}  (finish: {s['finish_reason']})", ""]
    if samples:
        mean = sum(s["similarity"] for s in samples) / len(samples)
        lines.append(f"mean similarity over {len(samples)} images: {mean:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint directory")
    p.add_argument("--images", default=str(TEST_IMAGES), help="folder with expected.json and the images")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--limit", type=int)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--json", help="also write the samples as JSON here")
    p.add_argument("--log-to", metavar="RUN_ID", help="log the samples (text + JSON) to this MLflow run")
    p.add_argument("--tracking-uri")
    p.add_argument("--regenerate", action="store_true", help="rewrite the images and expected.json")
    args = p.parse_args(argv)
    if args.regenerate:
        path = make_test_images(args.images)
        total = sum(f.stat().st_size for f in Path(args.images).iterdir() if f.is_file())
        print(f"wrote {path} ({total / 1024:.0f} KiB in {args.images})")
        if not args.checkpoint:
            return 0
    if not args.checkpoint:
        p.error("pass --checkpoint (or --regenerate)")
    samples = run_samples(args.checkpoint, args.images, args.max_new_tokens, args.limit, args.use_gpu)
    text = format_samples(samples)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    if args.log_to:
        from pipeline import tracking

        tracking.log_text(args.log_to, text + "\n", "vision_sample/samples.txt", tracking_uri=args.tracking_uri)
        tracking.log_dict(args.log_to, samples, "vision_sample/samples.json", tracking_uri=args.tracking_uri)
        mean = sum(s["similarity"] for s in samples) / max(1, len(samples))
        tracking.log_metrics(args.log_to, {"vision_sample/similarity": mean}, tracking_uri=args.tracking_uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
