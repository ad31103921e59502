"""Rows per second one CPU core renders for the synthetic stream, by task and crops per page.

    python bench/stream.py                               # line and page tasks, small mode
    python bench/stream.py --tasks line --crops 1,4,16 --pages 64
    python bench/stream.py --tasks line --crops 8 --crop-scales crop,page,zoom --mode base

Times :func:`pipeline.synth_stream.render_batch` (the Ray Data UDF: draw the page, crop, the
mode's processor, tokenize, the glyphs column) in this process over the same page indices for
each setting: what one Ray worker delivers. A GPU step of the tier-2 recipe takes ~128 samples
in ~0.4 s, so a stream that renders one line crop per page needs that many cores to keep up;
``crops_per_page`` renders the page once for several of its crops. Prints a table last.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def measure(task: str, crops: int, pages: int, mode: str, tokenizer_json: str, glyphs: bool,
            crop_scale: str = "crop") -> dict:
    from pipeline.synth_stream import SynthStreamConfig, _RenderSpec, render_batch

    stream = SynthStreamConfig(profile="reading", pages=pages, seed=0, mode=mode, tasks={task: 1.0},
                               crops_per_page=crops, crop_scale=crop_scale)
    spec = _RenderSpec(stream, tokenizer_json, 4096, glyphs)
    start = time.perf_counter()
    table = render_batch({"id": np.arange(pages)}, spec)
    seconds = time.perf_counter() - start
    return {"task": task, "crops": crops, "crop_scale": crop_scale, "pages": pages, "rows": table.num_rows,
            "seconds": seconds, "rows_per_s": table.num_rows / seconds, "pages_per_s": pages / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="line,free", help="comma-separated stream tasks, each timed alone")
    parser.add_argument("--crops", default="1,16",
                        help="comma-separated crops_per_page values (crop tasks: line, word, block)")
    parser.add_argument("--pages", type=int, default=32)
    parser.add_argument("--mode", default="small")
    parser.add_argument("--no-glyphs", action="store_true", help="without the glyphs column")
    parser.add_argument("--crop-scales", default="crop",
                        help="comma-separated crop_scale values (crop tasks: line, word, block)")
    args = parser.parse_args(argv)
    from model.tokenizer import Tokenizer
    from pipeline.synth import CROP_TASKS
    from pipeline.synth_stream import SynthStreamConfig, stream_texts

    tokenizer = Tokenizer.train(stream_texts(SynthStreamConfig(profile="reading"), 40), 1024)
    tokenizer_json = tokenizer.to_json()
    measure("free", 1, 4, args.mode, tokenizer_json, False)  # warm-up: fonts, corpus and tokenizer caches
    results = []
    for task in args.tasks.split(","):
        crop_task = task in CROP_TASKS
        for crops in ([int(c) for c in args.crops.split(",")] if crop_task else [1]):
            for scale in (args.crop_scales.split(",") if crop_task else ["crop"]):
                results.append(measure(task, crops, args.pages, args.mode, tokenizer_json, not args.no_glyphs, scale))
                print(results[-1], flush=True)
    print(f"\n### Synthetic stream render rate, one process, `{args.mode}` mode, {args.pages} pages each"
          f"{'' if args.no_glyphs else ', glyphs column on'}\n")
    print("| task | crops per page | crop scale | rows | pages/s | rows/s |")
    print("|---|---:|---|---:|---:|---:|")
    for r in results:
        scale = r["crop_scale"] if r["task"] in CROP_TASKS else ""
        print(f"| {r['task']} | {r['crops']} | {scale} | {r['rows']} | {r['pages_per_s']:.2f} | {r['rows_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
