"""Shared helpers for the GPU benchmarks: device facts and ceilings, model FLOP counts, synthetic
inputs, timing, and writing result tables.

Every benchmark prints a Markdown table and appends it, headed by the device, torch version and
date, to ``bench/RESULTS.md`` (``--results`` elsewhere), plus one JSON line per run to
``--json`` when given. All of them also run on the CPU with ``--preset tiny --quick`` (a smoke
test of the code path, not a measurement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

from model.config import preset as preset_config  # noqa: E402
from model.vlm import ImageViews, NanoDeepseekOCR  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' datasheets (what MFU is quoted against)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
RESULTS = ROOT / "bench" / "RESULTS.md"
TODAY = datetime.date.today().isoformat()  # the machine the bench runs on

# A4 page (1191 x 1684) in Gundam mode: 1024 global view + 2 cols x 3 rows of 640 tiles = 903 slots
A4_CROP = (2, 3)


# --------------------------------------------------------------------------------- arguments
def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the code path (CPU)")
    p.add_argument("--results", default=str(RESULTS), help="Markdown file the table is appended to ('' = none)")
    p.add_argument("--json", default="", help="append one JSON line of raw numbers to this file")
    p.add_argument("--seed", type=int, default=0)
    return p


# ------------------------------------------------------------------------------------ device
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 5, warmup: int = 1) -> list[float]:
    """Wall seconds of each of ``repeat`` calls (device synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 26)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, repeat=repeat, warmup=2)
    return 2 * nbytes / median(times)


def matmul_peak(device: torch.device, n: int = 8192, repeat: int = 10) -> float:
    """Measured bf16 matrix-product rate (FLOP/s) on random data (fp32 on the CPU)."""
    if device.type != "cuda":
        n, dtype = 512, torch.float32
    else:
        dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, device, repeat=repeat, warmup=3)
    return 2 * n ** 3 / median(times)


# ------------------------------------------------------------------------------------- model
def build_model(preset: str, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0,
                vocab_size: int | None = None, image_token_id: int = 3) -> NanoDeepseekOCR:
    """A random-weight model built directly on ``device``.

    nanochat zero-initialises the output projections and the head; those get small random
    values here so that activations, logits and timings are those of a real network (never
    benchmark on zeros).
    """
    cfg = preset_config(preset)
    if vocab_size is not None:
        cfg.gpt.vocab_size = vocab_size
    cfg.image_token_id = image_token_id
    torch.manual_seed(seed)
    with torch.device(device):
        model = NanoDeepseekOCR(cfg)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(0.0, 0.02)
    if dtype is not None:
        model = model.to(dtype)
    return model


# ------------------------------------------------------------------------------------ inputs
def random_views(size: int, tiles: int = 0, tile_size: int = 640, crop: tuple[int, int] = (1, 1),
                 rng: np.random.Generator | None = None) -> ImageViews:
    """Random uint8 views (noise: the encoder's cost does not depend on content)."""
    rng = rng or np.random.default_rng(0)
    g = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    t = rng.integers(0, 256, (tiles, tile_size, tile_size, 3), dtype=np.uint8) if tiles else None
    return ImageViews.from_arrays(g, t, crop)


def a4_page(rng: np.random.Generator | None = None) -> ImageViews:
    """An A4 page as Gundam mode cuts it: 1024 global view + 2x3 tiles of 640 (903 slots)."""
    return random_views(1024, tiles=6, tile_size=640, crop=A4_CROP, rng=rng)


def mode_views(mode: str, rng: np.random.Generator | None = None) -> ImageViews:
    from model.config import MODES

    spec = MODES[mode]
    if spec["crop_mode"]:
        return a4_page(rng)
    return random_views(spec["base_size"], rng=rng)


def autocast_for(device: torch.device):
    """The trainer's autocast: bf16 on CUDA, none elsewhere."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def training_step(model: NanoDeepseekOCR, batch, opt, device: torch.device,
                  extra_loss: Callable[[], torch.Tensor] | None = None,
                  read: bool = True) -> Callable[[], float | torch.Tensor]:
    """The trainer's step (``pipeline/train.py``) on a packed batch moved as the trainer moves it: the
    mean next-token loss (+ ``extra_loss()``, evaluated inside autocast after the forward),
    backward, clipping at 1.0 and the optimizer. It returns the loss read on the host (a wait for
    the device), or with ``read=False`` left on the device, as the trainer does between reports."""
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = autocast_for(device)
    n_targets = max(1, batch.n_target_tokens)

    def step() -> float:
        with autocast:
            loss = model(batch.input_ids, batch.images, batch.targets, positions=batch.positions,
                         segment_ids=batch.segment_ids, loss_reduction="sum") / n_targets
            if extra_loss is not None:
                loss = loss + extra_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()) if read else loss.detach()

    return step


# ----------------------------------------------------------------------------------- results
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[object]]
    notes: list[str]

    def markdown(self) -> str:
        def cell(v: object) -> str:
            if isinstance(v, float):
                return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
            return str(v)

        lines = ["| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in self.rows]
        return "\n".join(lines)


def environment(device: torch.device) -> str:
    return f"{device_name(device)}, torch {torch.__version__}, {TODAY}"


def report(table: Table, device: torch.device, args: argparse.Namespace, raw: dict | None = None) -> None:
    """Print the table; append it (with device, torch and date) to the results file and JSON."""
    text = f"### {table.title}\n\n_{environment(device)}{' (quick smoke run)' if args.quick else ''}_\n\n"
    text += table.markdown() + "\n"
    if table.notes:
        text += "\n" + "\n".join(f"- {n}" for n in table.notes) + "\n"
    print("\n" + text, flush=True)
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("# Benchmark results\n\nTables appended by the scripts in `bench/`.\n")
        with path.open("a") as f:
            f.write("\n" + text)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": table.title, "device": device_name(device), "torch": torch.__version__,
                                "date": TODAY, "quick": bool(args.quick), **(raw or {})}) + "\n")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
