"""Compare MLflow runs: the params that differ, the final metrics, and a PNG of the metric curves.

    python jobs/compare.py --experiment nano-deepseek-ocr                 # every run of an experiment
    python jobs/compare.py --run-ids 1a2b... 3c4d... --metrics loss lr
    python jobs/compare.py --experiment nano-deepseek-ocr --tag stage=1 --plot artifacts/compare.png
    python jobs/compare.py --experiment X --log-to RUN_ID                 # also log table + PNG to a run

The table goes to stdout (markdown, or CSV with ``--format csv``) and to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

try:
    import _common  # noqa: F401  (run as a script: puts the repo root on sys.path)
except ImportError:  # imported as jobs.compare
    from jobs import _common  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-ids", nargs="+", help="runs to compare (instead of --experiment)")
    p.add_argument("--experiment", nargs="+", help="experiment name(s) whose runs are compared")
    p.add_argument("--tag", action="append", help="key=value filter on run tags (repeatable)")
    p.add_argument("--metrics", nargs="+", help="metrics to show and plot (default: all but system/*)")
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI or sqlite:///artifacts/mlflow.db")
    p.add_argument("--plot", default="artifacts/compare/curves.png", help="PNG of the metric curves ('' for none)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--format", choices=["markdown", "csv"], default="markdown")
    p.add_argument("--log-to", metavar="RUN_ID", help="log the table and the PNG as artifacts of this run")
    p.add_argument("--json", action="store_true", help="print a JSON summary after the table")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.run_ids and not args.experiment:
        parser.error("pass --run-ids or --experiment")
    from pipeline import tracking

    uri = args.tracking_uri or tracking.tracking_uri()
    comparison = tracking.compare_runs(run_ids=args.run_ids, experiment=args.experiment, tag=args.tag,
                                       tracking_uri=uri, metrics=args.metrics)
    table = comparison.table(fmt=args.format)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    plot = None
    if args.plot:
        try:
            plot = tracking.plot_curves(comparison, args.plot, metrics=args.metrics, tracking_uri=uri)
            print(f"curves: {plot}")
        except ValueError as e:
            print(f"no curves plotted: {e}")
    if args.log_to:
        suffix = "csv" if args.format == "csv" else "md"
        tracking.log_text(args.log_to, table + "\n", f"compare/table.{suffix}", tracking_uri=uri)
        if plot is not None:
            tracking.log_artifact(args.log_to, str(plot), "compare", tracking_uri=uri)
    if args.json:
        print(json.dumps({**comparison.to_dict(), "plot": str(plot) if plot else None}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
