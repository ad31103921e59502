"""Stage 1 through Ray Train on GPU workers: synthetic pages -> Ray Data shards -> TorchTrainer.

    python bench/ray_train_gpu.py --preset small --pages 300 --steps 80 --mode base

Measures what the product path delivers (Ray Data streaming, packing, bf16 autocast, DDP when
``--num-workers`` > 1): tokens/s and step time from the run's MLflow metrics, and the final loss.
Prints a table and appends it to bench/RESULTS.md (``--results`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.append(str(REPO_ROOT / "jobs"))  # after the repo root: jobs/serve.py must not shadow serve/


def prepare_data(work: Path, preset: str, mode: str, pages: int, seq_len: int) -> tuple[int, float, float]:
    """Synthetic document pages -> Ray Data shards under ``work`` (reused when already there)."""
    from pipeline.preprocess import PreprocessConfig, run_preprocess
    from pipeline.synth import SynthConfig, generate

    stats = work / "shards" / "stats.json"
    if stats.is_file():
        return int(json.loads(stats.read_text())["rows_out"]), 0.0, 0.0
    t0 = time.perf_counter()
    manifest = generate(work / "pages", pages, SynthConfig.document(tasks=("markdown",), noise_prob=0.0), seed=0)
    t_synth = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = run_preprocess(PreprocessConfig(manifests=[str(manifest)], out=str(work / "shards"), mode=mode,
                                          preset=preset, vocab_size=8192, max_seq_len=seq_len))
    return int(pre.stats["rows_out"]), t_synth, time.perf_counter() - t0


def reachable_tracking_store(work: Path) -> str:
    """The MLflow store the runs log to: ``MLFLOW_TRACKING_URI`` if set, else the default SQLite
    store, else (the device's Ray bundle has MLflow without SQLAlchemy) a file store in ``work``.
    Set before Ray starts, so that its workers see the same store."""
    import importlib.util

    from pipeline import tracking

    if os.environ.get("MLFLOW_TRACKING_URI") or importlib.util.find_spec("sqlalchemy") is not None:
        return tracking.tracking_uri()
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    os.environ["MLFLOW_TRACKING_URI"] = (work.resolve() / "mlruns").as_uri()
    return os.environ["MLFLOW_TRACKING_URI"]


def train_run(work: Path, preset: str, num_workers: int, steps: int, batch_size: int, seq_len: int,
              strategy: str = "ddp", run_name: str | None = None, resume_from: str | None = None,
              checkpoint_every: int = 0, optimizer: str = "adamw", **train: object) -> dict:
    """One stage-1 run through TorchTrainer; tokens/s is the median over the second half of steps.

    ``strategy`` ddp or fsdp (FSDP2 per block, ``pipeline.distributed``); ``optimizer`` adamw or muon;
    ``train``: further ``TrainConfig`` fields (packing, prefetch).
    """
    import torch

    from pipeline import tracking
    from pipeline.train import load_train_config, run_stage

    cfg = load_train_config(None, stage=1, preset=preset, data=[str(work / "shards")], out=str(work / "runs"),
                            run_name=run_name or f"gpu-{preset}-{num_workers}", use_gpu=True,
                            num_workers=num_workers, strategy=strategy, steps=steps, batch_size=batch_size,
                            seq_len=seq_len, lr=1e-3, encoder_lr_scale=0.3, warmup_steps=10, log_every=1,
                            sample_prediction=False, experiment="bench-gpu", resume_from=resume_from,
                            checkpoint_every=checkpoint_every, optimizer=optimizer, **train)
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    result = run_stage(cfg)
    client = tracking.client()
    history = lambda key: [m.value for m in sorted(client.get_metric_history(result.run_id, key),  # noqa: E731
                                                   key=lambda m: m.step)]
    tps, mfu, loss, wait = history("tokens_per_s"), history("mfu"), history("loss"), history("data_wait_s")
    second_half = lambda xs: xs[len(xs) // 2:] or xs  # noqa: E731  (past compile and warm-up)
    return {"tokens_per_s": statistics.median(second_half(tps)), "mfu": mfu, "loss": loss, "result": result,
            "tokens_per_s_steps": tps, "data_wait_s": statistics.median(second_half(wait)) if wait else float("nan"),
            "peak_mem_gib": (history("peak_mem_gib") or [float("nan")])[-1]}


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
    parser.add_argument("--compile-vision", default="default", choices=("default", "on", "off", "both"),
                        help="TrainConfig.compile_vision (default: off); both: off, then on")
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--results", default=str(REPO_ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args(argv)

    import torch

    from _common import init_ray

    work = Path(args.out or tempfile.mkdtemp(prefix="ndocr-gpu-"))
    print(f"MLflow store: {reachable_tracking_store(work)}", flush=True)
    init_ray()
    rows_out, t_synth, t_pre = prepare_data(work, args.preset, args.mode, args.pages, args.seq_len)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = [
        ("device", f"{args.num_workers} x {device}"),
        ("preset / mode", f"{args.preset} / {args.mode} ({rows_out} rows)"),
        ("seq_len x batch", f"{args.seq_len} x {args.batch_size} per worker, {args.strategy}"),
        ("steps", str(args.steps)),
    ]
    settings = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[args.compile_vision]
    for compile_vision in settings:
        tag = {None: "default", True: "compiled", False: "eager"}[compile_vision]
        label = "" if compile_vision is None else f", vision {tag}"
        t0 = time.perf_counter()
        run = train_run(work, args.preset, args.num_workers, args.steps, args.batch_size, args.seq_len,
                        args.strategy, run_name=f"gpu-{args.preset}-{args.num_workers}-vision-{tag}",
                        **({} if compile_vision is None else {"compile_vision": compile_vision}))
        t_train = time.perf_counter() - t0
        tokens_per_s, mfu, loss, result = run["tokens_per_s"], run["mfu"], run["loss"], run["result"]
        rows += [
            (f"tokens/s (median, 2nd half){label}", f"{tokens_per_s:,.0f}"),
            (f"step time (s){label}", f"{args.batch_size * args.seq_len * args.num_workers / tokens_per_s:.3f}"),
            (f"MFU (GPT FLOPs only){label}",
             f"{statistics.median(mfu[len(mfu) // 2:]) * 100:.1f}%" if mfu else "n/a"),
            (f"loss first -> last{label}", f"{loss[0]:.3f} -> {loss[-1]:.3f}" if loss else "n/a"),
            (f"synth / preprocess / train (s){label}", f"{t_synth:.0f} / {t_pre:.0f} / {t_train:.0f}"),
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
