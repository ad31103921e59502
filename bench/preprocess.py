"""Preprocess throughput: the Ray Data job against a single-process loop over the same records.

    python bench/preprocess.py                 # 150 synthetic A4-like pages, Gundam mode
    python bench/preprocess.py --pages 40 --no-append

Both sides do the same work per record with the same code (``RecordProcessor``: read the
file, decode, Gundam global view + tiles, render tokens with the same tokenizer) and write
the same Parquet shards (zstd, same rows per file). The loop runs in this process; the Ray
job is ``run_preprocess`` on a local Ray with all cores, timed end to end (planning,
scheduling, reading the manifest, writing, stats), once cold (fresh workers) and once warm.
``ray.init`` itself is timed separately. The loop runs before and after the Ray runs and
the ratios use the mean of the two (load drifts on a shared machine). Results: a table on stdout, appended to
bench/RESULTS.md with the date, the machine and its load average (this box is shared).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/preprocess.py` from anywhere
    sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from model.processor import ImageProcessor  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from pipeline.preprocess import (PreprocessConfig, RecordProcessor, record_texts, rows_to_table,  # noqa: E402
                                 run_preprocess)
from pipeline.records import RecordError  # noqa: E402
from pipeline.synth import SynthConfig, generate  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def single_process(manifest: Path, tokenizer: Tokenizer, mode: str, max_seq_len: int, rows_per_file: int,
                   out: Path) -> tuple[float, int, int]:
    """(seconds, rows written, images) of the plain loop: same per-record code and shards."""
    proc = RecordProcessor(tokenizer, ImageProcessor.from_mode(mode), max_seq_len)
    base = str(manifest.parent)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows, n_rows, n_files, n_images = [], 0, 0, 0
    for line in manifest.read_text().splitlines():
        try:
            row = proc.process(line, base)
        except RecordError:
            continue
        rows.append(row)
        n_images += row["global_view"] is not None
        if len(rows) == rows_per_file:
            pq.write_table(rows_to_table(rows), out / f"part-{n_files:05d}.parquet", compression="zstd",
                           row_group_size=32)
            n_rows, n_files, rows = n_rows + len(rows), n_files + 1, []
    if rows:
        pq.write_table(rows_to_table(rows), out / f"part-{n_files:05d}.parquet", compression="zstd", row_group_size=32)
        n_rows += len(rows)
    return time.perf_counter() - t0, n_rows, n_images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=150)
    p.add_argument("--mode", default="gundam")
    p.add_argument("--rows-per-file", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--workdir", help="keep inputs/outputs here (default: a temporary directory)")
    p.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench-preprocess-")
    work = Path(args.workdir or tmp.name)
    load_before = os.getloadavg()
    t = time.perf_counter()
    manifest = generate(work / "pages", args.pages, SynthConfig.document(tasks=("markdown",)), seed=11)
    gen_s = time.perf_counter() - t
    lines = manifest.read_text().splitlines()
    tokenizer = Tokenizer.train((s for line in lines for s in record_texts(line)), 2048)
    tok_path = tokenizer.save(work / "tok")
    for f in sorted((work / "pages" / "images").iterdir()):  # same page cache state for both sides
        f.read_bytes()

    def loop() -> tuple[float, int, int]:
        return single_process(manifest, tokenizer, args.mode, args.max_seq_len, args.rows_per_file, work / "loop")

    loops = [loop()]

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t
    runs = []
    for label in ("cold", "warm"):
        cfg = PreprocessConfig(manifests=[str(manifest)], out=str(work / f"ray-{label}"), mode=args.mode,
                               tokenizer=str(tok_path), max_seq_len=args.max_seq_len,
                               rows_per_file=args.rows_per_file, max_error_fraction=0.0)
        t = time.perf_counter()
        result = run_preprocess(cfg)
        runs.append((label, time.perf_counter() - t, result.stats))
    ray.shutdown()
    loops.append(loop())  # the loop before and after the Ray runs: load drift on this shared box cancels
    load_after = os.getloadavg()

    _, loop_rows, loop_images = loops[0]
    loop_ips = sum(n / s for s, _, n in loops) / len(loops)
    header = ("| pipeline | workers | images | seconds | images/s | ratio vs loop |\n"
              "|---|---:|---:|---:|---:|---:|")
    table = [header]
    for label, (secs, _, n) in zip(("before", "after"), loops):
        table.append(f"| single-process loop ({label}) | 1 | {n} | {secs:.1f} | {n / secs:.2f} | "
                     f"{n / secs / loop_ips:.2f} |")
    summary = {"pages": args.pages, "mode": args.mode,
               "loop": [{"seconds": s, "images": n} for s, _, n in loops], "loop_images_per_s": loop_ips}
    for label, secs, stats in runs:
        n = sum(stats["image_token_histogram"].values())
        assert stats["rows_out"] == loop_rows and n == loop_images, "Ray job and loop wrote different rows"
        ips = n / secs
        table.append(f"| Ray Data job ({label}) | {os.cpu_count()} CPUs | {n} | {secs:.1f} | {ips:.2f} | "
                     f"{ips / loop_ips:.2f} |")
        summary[f"ray_{label}"] = {"seconds": secs, "images": n, "ratio": ips / loop_ips}
    hist = runs[-1][2]["image_token_histogram"]
    raw_mb = runs[-1][2]["bytes"]["image_raw"] / 1e6
    shard_mb = runs[-1][2]["bytes"]["shards"] / 1e6
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    notes = (f"{args.pages} synthetic A4-like pages (`SynthConfig.document()`, 640-1280 px wide), mode "
             f"`{args.mode}`, one markdown record per page, {args.rows_per_file} rows per file, zstd; image "
             f"tokens per page {hist}; raw uint8 views {raw_mb:.0f} MB -> shards {shard_mb:.0f} MB. "
             f"Ratios are against the mean images/s of the two loop runs. "
             f"Ray: `run_preprocess` end to end (`ray.init` {init_s:.1f} s not included). "
             f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (shared machine: "
             f"other jobs competed for the same cores). Page generation took {gen_s:.0f} s.")
    text = "\n".join(table)
    print(text)
    print(notes)
    print(json.dumps(summary))
    if not args.no_append:
        block = (f"\n## Preprocess throughput (bench/preprocess.py) — {machine()}, {date}\n\n{text}\n\n{notes}\n")
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n")
        with RESULTS.open("a") as fh:
            fh.write(block)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
