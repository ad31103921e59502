"""Stage 2: freeze SAM + compressor, train the rest on a vision/text mixture (Ray Train).

    python jobs/stage2.py --config jobs/configs/stage2_tiny.yaml --init-from artifacts/runs/stage1-tiny/final
"""

from __future__ import annotations

import argparse
import json

import _common  # noqa: F401  (puts the repo root on sys.path)
from _common import add_train_args, init_ray, train_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    parser.add_argument("--init-from", dest="init_from", help="the stage-1 checkpoint directory")
    parser.add_argument("--text-ratio", dest="text_ratio", type=float, help="share of text-only rows (default 0.1)")
    parser.add_argument("--register-model", dest="register_model", help="MLflow registered model name")
    args = parser.parse_args(argv)
    from pipeline.train import load_train_config, run_stage

    cfg = load_train_config(args.config, stage=2, init_from=args.init_from, text_ratio=args.text_ratio,
                            register_model=args.register_model, **train_overrides(args))
    init_ray(args.address)
    result = run_stage(cfg)
    print(json.dumps({"stage": 2, "checkpoint": result.checkpoint_dir, "run_id": result.run_id,
                      "model_version": result.model_version, "final_loss": result.metrics.get("loss")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
