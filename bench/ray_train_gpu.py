"""Stage 1 through Ray Train on GPU workers: synthetic pages -> Ray Data shards -> TorchTrainer.

    python bench/ray_train_gpu.py --preset small --pages 300 --steps 80 --mode base

Measures what the product path delivers (Ray Data streaming, packing, bf16 autocast, DDP when
``--num-workers`` > 1): tokens/s and step time from the run's MLflow metrics, and the final loss.
Prints a table and appends it to bench/RESULTS.md (``--results`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "jobs"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mode", default="base")
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--results", default=str(REPO_ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args(argv)

    import torch

    from _common import init_ray
    from pipeline import tracking
    from pipeline.preprocess import PreprocessConfig, run_preprocess
    from pipeline.synth import SynthConfig, generate
    from pipeline.train import load_train_config, run_stage

    work = Path(args.out or tempfile.mkdtemp(prefix="ndocr-gpu-"))
    init_ray()
    t0 = time.perf_counter()
    manifest = generate(work / "pages", args.pages, SynthConfig.document(tasks=("markdown",), noise_prob=0.0), seed=0)
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = run_preprocess(PreprocessConfig(manifests=[str(manifest)], out=str(work / "shards"), mode=args.mode,
                                          preset=args.preset, vocab_size=8192, max_seq_len=args.seq_len))
    t_pre = time.perf_counter() - t0
    cfg = load_train_config(None, stage=1, preset=args.preset, data=[str(work / "shards")], out=str(work / "runs"),
                            run_name=f"gpu-{args.preset}", use_gpu=True, num_workers=args.num_workers,
                            strategy=args.strategy, steps=args.steps, batch_size=args.batch_size,
                            seq_len=args.seq_len, lr=1e-3, encoder_lr_scale=0.3, warmup_steps=10,
                            log_every=5, sample_prediction=False, experiment="bench-gpu")
    t0 = time.perf_counter()
    result = run_stage(cfg)
    t_train = time.perf_counter() - t0
    client = tracking.client()
    tps = [m.value for m in client.get_metric_history(result.run_id, "tokens_per_s")]
    mfu = [m.value for m in client.get_metric_history(result.run_id, "mfu")]
    loss = [m.value for m in client.get_metric_history(result.run_id, "loss")]
    steady = tps[len(tps) // 2:] or tps
    tokens_per_s = statistics.median(steady)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = [
        ("device", f"{args.num_workers} x {device}"),
        ("preset / mode", f"{args.preset} / {args.mode} ({pre.stats.get('rows_out')} rows)"),
        ("seq_len x batch", f"{args.seq_len} x {args.batch_size} per worker, {args.strategy}"),
        ("steps", str(args.steps)),
        ("tokens/s (median, 2nd half)", f"{tokens_per_s:,.0f}"),
        ("step time (s)", f"{args.batch_size * args.seq_len * args.num_workers / tokens_per_s:.3f}"),
        ("MFU (GPT FLOPs only)", f"{statistics.median(mfu[len(mfu) // 2:]) * 100:.1f}%" if mfu else "n/a"),
        ("loss first -> last", f"{loss[0]:.3f} -> {loss[-1]:.3f}" if loss else "n/a"),
        ("synth / preprocess / train (s)", f"{t_synth:.0f} / {t_pre:.0f} / {t_train:.0f}"),
    ]
    table = "\n".join(["| quantity | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## Ray Train stage 1 on GPU (bench/ray_train_gpu.py) — {device}, torch {torch.__version__}, "
               f"{stamp}\n\n{table}\n")
    print(section)
    print(json.dumps({"tokens_per_s": tokens_per_s, "checkpoint": result.checkpoint_dir}))
    with open(args.results, "a") as f:
        f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
