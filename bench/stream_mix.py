"""Where a tier-2 step's compute and its next-token loss go, by stream task (issue 10).

    python bench/stream_mix.py --config jobs/configs/speedrun_tier2_zoom_pages.yaml --pages 96

Why: a recipe's ``stream_tasks`` weights pages, not samples, and a ``line`` page gives up to
``stream_crops_per_page`` crops, each a whole view through SAM and CLIP for one line of text. So the
share of a step that each task takes, and of the tokens it trains the decoder on, is not its weight.
This renders the recipe's first stream pages exactly as its stage 1 does
(:func:`pipeline.synth_stream.render_batch`, with a tokenizer trained on the stream's own text at the
recipe's vocabulary size), and counts each row's training FLOPs from :mod:`model.flops` (3x the views'
forward + the GPT's 6 x params per token and its attention) and its loss tokens (the response). The
glyph loss (``glyph_loss``) is left out: it supervises every view, whatever its task. Prints a table last.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def row_costs(table, cfg) -> list[dict]:
    """Task, tokens, vision tokens, loss tokens and training FLOPs of each rendered shard row, read
    as the trainer reads it (:func:`pipeline.train.row_to_sample`)."""
    from model.flops import gpt_train_flops, image_flops
    from pipeline.train import row_to_sample

    out = []
    for row in table.to_pylist():
        sample = row_to_sample(row)
        tokens = len(sample.input_ids)
        vision = 3 * sum(image_flops(cfg, im) for im in sample.images)
        out.append({"task": row["task"], "tokens": tokens, "vision_tokens": row["n_image_tokens"],
                    "loss_tokens": int(sample.loss_mask.sum()),
                    "flops": vision + gpt_train_flops(cfg, [tokens]), "vision_flops": vision})
    return out


def mix_table(costs: list[dict]) -> list[str]:
    """Per task: its share of the rows, of the training FLOPs and of the loss tokens, and the means."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for c in costs:
        by_task[c["task"]].append(c)
    total_rows = len(costs)
    total_flops = sum(c["flops"] for c in costs)
    total_loss = sum(c["loss_tokens"] for c in costs)
    lines = ["| task | rows | share of rows | share of FLOPs | share of loss tokens | tokens / row | "
             "vision tokens / row | loss tokens / row | vision share of its FLOPs | loss tokens per TFLOP |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task in sorted(by_task, key=lambda t: -len(by_task[t])):
        rows = by_task[task]
        flops = sum(c["flops"] for c in rows)
        loss = sum(c["loss_tokens"] for c in rows)
        mean = lambda key: np.mean([c[key] for c in rows])  # noqa: E731
        lines.append(f"| {task} | {len(rows)} | {len(rows) / total_rows:.1%} | {flops / total_flops:.1%} | "
                     f"{loss / total_loss:.1%} | {mean('tokens'):.0f} | {mean('vision_tokens'):.0f} | "
                     f"{mean('loss_tokens'):.1f} | {sum(c['vision_flops'] for c in rows) / flops:.1%} | "
                     f"{loss / flops * 1e12:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    sys.path.append(str(ROOT / "jobs"))  # after the root: jobs/serve.py must not shadow the serve package
    import speedrun
    from model.config import preset
    from model.tokenizer import Tokenizer
    from pipeline.synth_stream import SynthStreamConfig, _RenderSpec, render_batch, stream_texts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a speedrun YAML whose stage 1 trains on the stream")
    p.add_argument("--pages", type=int, default=96, help="stream pages to render (the first ones)")
    p.add_argument("--tokenizer-pages", type=int, default=100, help="stream pages whose text trains the tokenizer")
    args = p.parse_args(argv)
    if args.pages < 1 or args.tokenizer_pages < 1:
        p.error("--pages and --tokenizer-pages must be >= 1")

    cfg = speedrun.load_config(args.config)
    if not cfg.stream_pages:
        raise SystemExit(f"{args.config}: stage 1 does not train on the stream (stream_pages is 0)")
    stream = SynthStreamConfig(**speedrun.stream_settings(cfg))
    tokenizer = Tokenizer.train(stream_texts(stream, args.tokenizer_pages), cfg.vocab_size)
    spec = _RenderSpec(stream, tokenizer.to_json(), cfg.max_seq_len, glyphs=False)
    table = render_batch({"id": np.arange(args.pages)}, spec)
    costs = row_costs(table, preset(cfg.preset))
    print(f"\n### Where a step goes by stream task: {args.config}, the stream's first {args.pages} pages "
          f"({table.num_rows} rows; `{cfg.preset}` preset, `{cfg.mode}` mode)\n")
    print("\n".join(mix_table(costs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
