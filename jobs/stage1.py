"""Stage 1: train the whole model on vision data (Ray Train).

    python jobs/stage1.py --config jobs/configs/stage1_tiny.yaml
    ray job submit --working-dir . -- python jobs/stage1.py --config jobs/configs/stage1_full.yaml \
        --num-workers 8 --use-gpu --data s3://bucket/shards
"""

from __future__ import annotations

import argparse
import json

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import add_train_args, init_ray, train_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    args = parser.parse_args(argv)
    from pipeline.train import load_train_config, run_stage

    cfg = load_train_config(args.config, stage=1, **train_overrides(args))
    init_ray(args.address)
    result = run_stage(cfg)
    print(json.dumps({"stage": 1, "checkpoint": result.checkpoint_dir, "run_id": result.run_id,
                      "final_loss": result.metrics.get("loss")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
