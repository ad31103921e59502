"""Load test of the OCR service: throughput and p50/p99 latency against concurrency.

    python bench/serve_load.py --url http://127.0.0.1:8000            # a running service
    python bench/serve_load.py --checkpoint artifacts/runs/stage2-tiny/final   # starts its own
    python bench/serve_load.py --checkpoint CKPT --gpu                 # own service on one GPU

Each level sends ``--requests`` requests (default: max(16, 4 x concurrency)) from
``concurrency`` concurrent clients to ``POST /v1/ocr`` and reports requests/s, output
tokens/s and latency percentiles. The table is printed and appended to bench/RESULTS.md
with the device it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
SECTION_TITLE = "## Serve load (bench/serve_load.py)"


def page_png(width: int = 640, height: int = 480) -> bytes:
    """A synthetic document page: a title and a few lines of text."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((24, 20), "Quarterly report", fill="black")
    for i in range(12):
        draw.text((24, 60 + 30 * i), f"Line {i}: the quick brown fox jumps over the lazy dog.", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 16 samples is the maximum)."""
    ordered = sorted(values)
    rank = max(1, int(-(-q * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


async def run_level(url: str, concurrency: int, n_requests: int, image: bytes, fields: dict,
                    headers: dict, timeout: float) -> dict:
    import httpx

    latencies: list[float] = []
    tokens = 0
    errors: dict[str, int] = {}
    counter = iter(range(n_requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for _ in counter:
            start = time.perf_counter()
            try:
                r = await client.post("/v1/ocr", files={"file": ("page.png", image, "image/png")}, data=fields)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["output_tokens"]

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = len(latencies)
    return {
        "concurrency": concurrency, "requests": n_requests, "ok": ok, "errors": errors, "wall_s": wall,
        "req_per_s": ok / wall if wall else 0.0, "tok_per_s": tokens / wall if wall else 0.0,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_s": percentile(latencies, 99) if latencies else float("nan"),
        "mean_tokens": tokens / ok if ok else 0.0,
    }


def table(rows: list[dict], device: str) -> str:
    lines = ["| device | concurrency | requests | ok | req/s | output tok/s | p50 latency (s) | p99 latency (s) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        errs = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "-"
        lines.append(f"| {device} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['req_per_s']:.2f} | "
                     f"{r['tok_per_s']:.1f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | {errs} |")
    return "\n".join(lines)


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(args: argparse.Namespace) -> str:
    """Start a local Ray + Serve with this checkpoint; returns the base URL."""
    import ray
    from ray import serve

    from serve.app import build_app

    gpu = {"VisionEncoder": {"num_gpus": 0.25}, "TextDecoder": {"num_gpus": 0.5}} if args.gpu else {}
    deployments = {
        "VisionEncoder": {"max_batch_size": args.encoder_batch, **gpu.get("VisionEncoder", {})},
        "TextDecoder": {"max_batch_size": args.decoder_batch, **gpu.get("TextDecoder", {})},
    }
    app = build_app({"checkpoint": args.checkpoint, "device": "cuda" if args.gpu else args.device,
                     "api_key": args.api_key, "torch_threads": args.torch_threads,
                     "limits": {"default_max_tokens": args.max_tokens, "max_tokens_limit": max(args.max_tokens, 64)}, "deployments": deployments})
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="ocr", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def append_results(text: str) -> None:
    """Append a section to bench/RESULTS.md (created with a title when absent); never rewrites it."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = RESULTS.read_text() if RESULTS.exists() else ""
    with RESULTS.open("a") as f:
        if not existing.strip():
            f.write("# Benchmark results\n")
            existing = "# Benchmark results\n"
        f.write(("\n" if existing.endswith("\n") else "\n\n") + text.rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (default: start one with --checkpoint)")
    parser.add_argument("--checkpoint", help="checkpoint to serve when starting a service here")
    parser.add_argument("--device", default="auto", help="device of a service started here (auto|cpu|cuda)")
    parser.add_argument("--gpu", action="store_true", help="own service on one GPU (encoder 0.25, decoder 0.5)")
    parser.add_argument("--device-label", help="device name for the table (default: detected)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="comma-separated levels")
    parser.add_argument("--requests", type=int, help="requests per level (default max(16, 4 x concurrency))")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--task", default="free")
    parser.add_argument("--mode", help="resolution mode (default: the checkpoint's)")
    parser.add_argument("--api-key", default=os.environ.get("NDOCR_API_KEY"))
    parser.add_argument("--encoder-batch", type=int, default=16)
    parser.add_argument("--decoder-batch", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--note", help="a line written under the table in RESULTS.md")
    parser.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if not args.url and not args.checkpoint:
        parser.error("give --url of a running service or --checkpoint to start one")

    url = args.url or start_service(args)
    device = args.device_label or ("remote service" if args.url else describe_device("cuda" if args.gpu else args.device))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    fields = {"task": args.task, "max_tokens": str(args.max_tokens), **({"mode": args.mode} if args.mode else {})}
    image = page_png()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]

    warm = asyncio.run(run_level(url, 1, 2, image, fields, headers, args.timeout))  # first-call setup off the clock
    if warm["ok"] == 0:
        print(f"warm-up failed: {warm['errors']}", file=sys.stderr)
        return 1
    rows = []
    for c in levels:
        n = args.requests or max(16, 4 * c)
        row = asyncio.run(run_level(url, c, n, image, fields, headers, args.timeout))
        rows.append(row)
        print(f"concurrency {c:>3}: {row['req_per_s']:.2f} req/s, p50 {row['p50_s']:.3f} s, p99 {row['p99_s']:.3f} s, "
              f"errors {row['errors'] or 0}", flush=True)
    out = table(rows, device)
    print()
    print(out)
    if not args.no_append:
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        ckpt = args.checkpoint or "(running service)"
        text = (f"{SECTION_TITLE} — {device}, {when}\n\n"
                f"`POST /v1/ocr` task `{args.task}`, max_tokens {args.max_tokens}, a 640x480 synthetic page, "
                f"mode {args.mode or 'checkpoint default'}; checkpoint `{ckpt}`; "
                f"encoder batch <= {args.encoder_batch}, decoder rows {args.decoder_batch}; one replica each.\n\n"
                f"{out}\n")
        if args.note:
            text += f"\n{args.note}\n"
        append_results(text)
        print(f"\nappended to {RESULTS}")
    if not args.url:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
