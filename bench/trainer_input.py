"""How fast the trainer's data thread turns stream rows into packed batches, one thread.

    python bench/trainer_input.py                      # base-mode views, 8 x 2048-token batches
    python bench/trainer_input.py --rows 128 --mode small

Times what ``pipeline.train`` runs on its prefetch thread for every step, minus the pinning and the
copy to the GPU: ``iter_shard_rows`` over a materialised dataset of shard rows, ``row_to_sample``
(decode the row, views to channels-first tensors) and ``batches`` (pack into rows, collate), streamed
as the trainer streams them. Ray's GPU workers run torch on one thread, as here. Why: the tier-2
trainer waited ~0.05 s of each ~0.23 s step for data (bench/RESULTS.md, session 24) while the
stream's render cores had room to spare, and a step holds ~50 base-mode views of 3 MB each. Views
are noise: the cost does not depend on content.
Prints a table last.
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
import torch  # noqa: E402


def shard_rows(n: int, mode: str, tokens: int, seed: int = 0) -> list[dict]:
    from model.config import MODES
    from pipeline.preprocess import shard_row

    size = MODES[mode]["base_size"]
    rng = np.random.default_rng(seed)
    view = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [shard_row(f"r{i}", "line", list(range(tokens)), [0] * (tokens // 2) + [1] * (tokens - tokens // 2),
                      mode=mode, global_view=view, tiles=np.zeros((0, size, size, 3), np.uint8), spatial_crop=[1, 1],
                      n_image_tokens=tokens // 2) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="rows in the dataset (each read once)")
    parser.add_argument("--mode", default="base", help="the views' mode (its global view size)")
    parser.add_argument("--tokens", type=int, default=320, help="tokens a row carries (base-mode line crop: ~300)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    import ray

    from pipeline.mixture import batches
    from pipeline.preprocess import rows_to_table
    from pipeline.train import iter_shard_rows, row_to_sample

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        dataset = ray.data.from_arrow(rows_to_table(shard_rows(args.rows, args.mode, args.tokens))).materialize()
        timings = {"rows": 0.0, "row_to_sample": 0.0}

        def timed_rows(it):
            while True:
                start = time.perf_counter()
                row = next(it, None)
                timings["rows"] += time.perf_counter() - start
                if row is None:
                    return
                yield row

        def timed_samples(rows):
            for row in rows:
                start = time.perf_counter()
                sample = row_to_sample(row)
                timings["row_to_sample"] += time.perf_counter() - start
                yield sample

        # streamed as the trainer does: each batch is dropped before the next (memory is reused)
        packed_rows = 0
        start = time.perf_counter()
        rows = iter_shard_rows(dataset.iterator())  # as the trainer reads its shard
        for batch in batches(timed_samples(timed_rows(rows)), args.seq_len, args.batch_size):
            packed_rows += batch.input_ids.shape[0]
            del batch
        total = time.perf_counter() - start
        timings["batches"] = total - timings["rows"] - timings["row_to_sample"]
    finally:
        ray.shutdown()
    per_step = args.rows / (packed_rows / args.batch_size)  # stream rows a step takes (the last may be partial)
    print(f"\n### Trainer input path, one thread, `{args.mode}` views, {args.rows} rows of {args.tokens} tokens, "
          f"{args.batch_size} x {args.seq_len} per step (~{per_step:.0f} rows a step)\n")
    print("| part | ms per row | ms per step |")
    print("|---|---:|---:|")
    for name, seconds in [*timings.items(), ("total", total)]:
        print(f"| {name} | {seconds / args.rows * 1e3:.2f} | {seconds / args.rows * 1e3 * per_step:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
