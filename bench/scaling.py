"""Multi-GPU scaling of stage 1 on Ray Train: 1 GPU worker vs N on one host, same per-GPU batch.

    python bench/scaling.py --gpus 1,2 --preset full --mode gundam --steps 30

For each N: tokens/s (median of the second half of the steps), step time, scaling efficiency
= tokens/s at N / (N x tokens/s at 1), the per-step spread of tokens/s, the median time a step
waited for data, and peak memory per GPU. ``--packing greedy,balanced`` measures both ways of
packing rows: greedy (tokens only, arrival order) and balanced (at most ``--max-row-mp``
megapixels of views per row, ``--lookahead`` samples may wait), which evens out the vision
work that every data-parallel step waits for. With ``--resume-check`` (all
strategies, or a comma list such as ``--resume-check fsdp``) the largest-N run writes a
checkpoint and a 1-GPU DDP run resumes from it (a different N, and for fsdp a different
strategy) for a few more steps. ``fsdp`` is FSDP2 sharded per
block (``pipeline.distributed``); at N = 1 it is the plain one-GPU model (nothing to shard).
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc.) in the driver and, through Ray's runtime
env, in every worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))
sys.path.append(str(REPO_ROOT / "jobs"))  # after the repo root: jobs/serve.py must not shadow serve/

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2", help="comma-separated worker counts (1 first)")
    parser.add_argument("--preset", default="full")
    parser.add_argument("--mode", default="gundam")
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1, help="packed rows per GPU")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-steps per optimizer step (one gradient all-reduce per step)")
    parser.add_argument("--strategies", default="ddp", help="ddp and/or fsdp (FSDP2, per block), comma-separated")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
    parser.add_argument("--resume-check", nargs="?", const="all", default="",
                        help="strategies whose largest-N checkpoint a 1-GPU run resumes (bare flag: all)")
    parser.add_argument("--packing", default="greedy", help="greedy and/or balanced, comma-separated")
    parser.add_argument("--max-row-mp", type=float, default=7.2,
                        help="balanced packing: megapixels of views per row (a 2x3-tile Gundam page is 3.5)")
    parser.add_argument("--lookahead", type=int, default=16, help="balanced packing: samples that may wait")
    parser.add_argument("--prefetch", type=int, default=2, help="micro-batches prepared on a background thread")
    parser.add_argument("--out", default=None)
    parser.add_argument("--results", default=str(REPO_ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args(argv)
    os.environ.update(NO_MULTICAST)
    import ray
    import torch

    from ray_train_gpu import prepare_data, reachable_tracking_store, train_run

    work = Path(args.out or tempfile.mkdtemp(prefix="ndocr-scaling-"))
    print(f"MLflow store: {reachable_tracking_store(work)}", flush=True)
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(runtime_env={"env_vars": {**NO_MULTICAST, "PYTHONPATH": pythonpath}})
    rows_out, _, _ = prepare_data(work, args.preset, args.mode, args.pages, args.seq_len)
    counts = [int(n) for n in args.gpus.split(",")]
    results = []
    resume = set(args.strategies.split(",")) if args.resume_check == "all" else set(filter(None, args.resume_check.split(",")))
    packings = {"greedy": {"max_row_megapixels": None, "pack_lookahead": 1},
                 "balanced": {"max_row_megapixels": args.max_row_mp, "pack_lookahead": args.lookahead}}
    for packing in args.packing.split(","):
        if packing not in packings:
            parser.error(f"--packing: {packing!r} is not one of {sorted(packings)}")
        pack = {**packings[packing], "prefetch_batches": args.prefetch, "grad_accum": args.grad_accum}
        single = None  # one worker is the same plain model whatever the strategy: measured once
        for strategy in args.strategies.split(","):
            base = None
            for n in counts:
                resume_here = strategy in resume and n == max(counts) and n > 1
                if n == 1 and single is not None:
                    base = single
                    continue
                run = train_run(work, args.preset, n, args.steps, args.batch_size, args.seq_len, strategy,
                                run_name=f"scale-{packing}-{strategy}-{n}", optimizer=args.optimizer,
                                checkpoint_every=args.steps if resume_here else 0, **pack)
                tps = run["tokens_per_s"]
                if n == 1:
                    base = single = tps
                eff = tps / (n * base) if base else float("nan")
                step_s = args.batch_size * args.seq_len * args.grad_accum * n / tps
                steady = sorted(run["tokens_per_s_steps"][args.steps // 2:]) or [float("nan")]
                results.append((packing, strategy, n, tps, step_s, eff, f"{steady[0]:,.0f}-{steady[-1]:,.0f}",
                                run["data_wait_s"], run["peak_mem_gib"], run["loss"][-1]))
                print(f"{packing} {strategy} N={n}: {tps:,.0f} tok/s, step {step_s:.3f}s, efficiency {eff:.2%}, "
                      f"data wait {run['data_wait_s'] * 1e3:.1f} ms", flush=True)
                if resume_here:
                    resumed = train_run(work, args.preset, 1, args.steps + 5, args.batch_size, args.seq_len, "ddp",
                                        run_name=f"resume-{packing}-{strategy}-{n}-to-1", optimizer=args.optimizer,
                                        resume_from=run["result"].checkpoint_dir, **pack)
                    print(f"resume: checkpoint at step {args.steps} on {n} GPUs -> 1 GPU, finished step "
                          f"{int(resumed['result'].metrics.get('step', -1))}, loss {resumed['loss'][-1]:.3f}",
                          flush=True)
                    results.append((packing, f"resume {strategy} {n}->1", 1, resumed["tokens_per_s"], float("nan"),
                                    float("nan"), "", resumed["data_wait_s"], resumed["peak_mem_gib"],
                                    resumed["loss"][-1]))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lines = ["| packing | strategy | GPUs | tokens/s | step (s) | scaling efficiency | per-step tokens/s "
             "(min-max, 2nd half) | data wait (ms) | peak mem / GPU (GiB) | last loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for packing, strategy, n, tps, step_s, eff, spread, wait, mem, loss in results:
        lines.append(f"| {packing} | {strategy} | {n} | {tps:,.0f} | {step_s:.3f} | {eff:.1%} | {spread} | "
                     f"{wait * 1e3:.1f} | {mem:.1f} | {loss:.3f} |")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n## Multi-GPU scaling (bench/scaling.py) — {device}, torch {torch.__version__}, {stamp}\n\n"
               f"{args.preset} preset, {args.mode} mode ({rows_out} rows), {args.optimizer}, "
               f"{args.batch_size} x {args.seq_len} tokens per GPU per micro-step, {args.grad_accum} micro-steps "
               f"per step, {args.steps} steps per run, "
               f"balanced = at most {args.max_row_mp} MP of views per row with a lookahead of {args.lookahead}, "
               f"prefetch {args.prefetch}, one host.\n\n" + "\n".join(lines) + "\n")
    print(section)
    with open(args.results, "a") as f:
        f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
