"""Preprocess record manifests into Parquet training shards (Ray Data).

    python jobs/preprocess.py --manifest artifacts/synth/manifest.jsonl --out artifacts/shards --mode tiny
    python jobs/preprocess.py --config jobs/configs/preprocess_tiny.yaml --max-error-fraction 0.2
    ray job submit --working-dir . -- python jobs/preprocess.py \\
        --config jobs/configs/preprocess_full.yaml --manifest s3://bucket/pages/manifest.jsonl --out s3://bucket/shards

Flags override the YAML's values (its keys mirror the flags). Writes out/part-*.parquet,
out/errors/part-*.parquet (bad records with reasons), out/stats.json and out/tokenizer.json.
Exit status 1 (with the reason on stderr) when more than --max-error-fraction of the
records failed; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import init_ray

MODES = ("tiny", "small", "base", "large", "gundam")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file whose keys mirror these flags (jobs/configs/preprocess_*.yaml)")
    p.add_argument("--manifest", dest="manifests", nargs="+", action="extend",
                   help="JSONL or Parquet manifests (files or Parquet directories), local or s3://")
    p.add_argument("--out", help="output directory, local or s3://")
    p.add_argument("--mode", choices=MODES, help="resolution mode of the image processor")
    p.add_argument("--preset", choices=["tiny", "small", "full"], help="model preset for default vocab/seq len")
    p.add_argument("--max-crops", dest="max_crops", type=int, help="largest tile grid (cols*rows) in gundam mode")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: train one on the manifests' text)")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, help="vocabulary of a trained tokenizer")
    p.add_argument("--max-seq-len", dest="max_seq_len", type=int, help="longer rows go to the errors table")
    p.add_argument("--rows-per-file", dest="rows_per_file", type=int, help="most rows per shard file")
    p.add_argument("--max-error-fraction", dest="max_error_fraction", type=float,
                   help="fail when more than this fraction of the records is bad")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, help="refuse larger images (decompression bombs)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="records per Ray Data batch")
    p.add_argument("--address", help="Ray address (default: RAY_ADDRESS or a local in-process Ray)")
    return p


def build_config(argv: list[str] | None = None) -> tuple[Any, str | None]:
    """(PreprocessConfig, Ray address) from YAML + flags; flags win."""
    from pipeline.preprocess import load_preprocess_config

    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "address")}
    address = args.address
    if args.config:
        import yaml

        from pipeline import storage

        loaded = yaml.safe_load(storage.read_text(args.config)) or {}
        if isinstance(loaded, dict):
            address = address or loaded.get("address")
    return load_preprocess_config(args.config, **overrides), address


def main(argv: list[str] | None = None) -> int:
    from pipeline.preprocess import PreprocessError, format_summary, run_preprocess

    try:
        cfg, address = build_config(argv)
        cfg.validate()
    except ValueError as exc:
        print(f"preprocess: {exc}", file=sys.stderr)
        return 2
    init_ray(address)
    try:
        result = run_preprocess(cfg)
    except PreprocessError as exc:
        if exc.result is not None:
            print(format_summary(exc.result.stats))
        print(f"\n{exc}", file=sys.stderr)
        return 1
    print(format_summary(result.stats))
    print(json.dumps({"out": result.out, "rows_out": result.rows_out, "rows_failed": result.rows_failed,
                      "stats": result.stats_path, "tokenizer": result.tokenizer_path}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
