"""SAM's relative-position attention alone: the ways it can run, timed and checked.

SAM adds decomposed relative positions (MViTv2) to every score. The paths:
- ``bias``: the [b, heads, N, N] additive bias materialised and passed to SDPA (``model.sam``'s
  CPU path);
- ``fold``: the bias folded into wider dot products so one flash call runs it (head dim d + h + w;
  ``model.sam``'s CUDA path), also held to one SDPA kernel family (``fold-cudnn``, ``fold-flash``,
  ``fold-efficient``); ``fold-narrow-v`` leaves v at head dim d (P @ V and its gradients at d, not
  d + h + w), which cuDNN (Hopper) and the efficient kernel take but flash does not
  (``fold-narrow-v-cudnn``, ``fold-narrow-v-efficient``);
- ``triton``: ``model.relpos_attention``'s flash kernel, which adds the tables tile by tile (head
  dim d; ``NANO_OCR_SAM_GLOBAL_ATTENTION=triton`` runs SAM's global blocks on it), also with other
  launch settings (``triton-m128``: 128 queries a program and 8 warps; ``triton-m64w8``);
- ``flex``: FlexAttention adding the two small per-query tables inside the kernel (head dim d);
- ``none``: plain flash attention without relative positions, the floor none of them can beat:
  what a fused relative-position kernel could get back.

Shapes (``--shapes``): ``bench`` is one training step's worth of the bench's batch
(``train_step.py``: 4 Gundam pages = 4 global views at 1024 px and 24 tiles at 640 px, SAM-B's 12
heads), for the global blocks and the 14x14 window blocks; ``tier2`` is one step of the tier-2
recipe (small preset, 6 heads, ~48 base-mode views at 1024 px a step), whose three global blocks
took 38% of its step in session 26's profile. Each path is checked against the fp32 bias path
(output and every input's gradient, on the first views when a batch is too large for the fp32
bias) and timed forward and forward + backward.

    python bench/sam_attention.py
    python bench/sam_attention.py --shapes tier2 --paths fold,fold-narrow-v,fold-narrow-v-cudnn,triton,none
    python bench/sam_attention.py --quick   # small shapes, still CUDA (FlexAttention has no CPU backward)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import Table, base_parser, median, report, timed

from model.sam import (decomposed_rel_pos_bias, query_rel_pos_tables, rel_pos_flash_attention,
                       rel_pos_triton_attention)

HEAD_DIM = 64  # SAM-B's and the small preset's
# (name, grid side, batch, heads) of one step's global blocks and 14x14 window blocks
SHAPES = {
    "bench": [("global 1024 px", 64, 4, 12), ("global 640 px", 40, 24, 12), ("windows 1024 px", 14, 100, 12),
              ("windows 640 px", 14, 216, 12)],
    # 48 views, each padded to 70 x 70 = 25 windows of 14 x 14
    "tier2": [("tier-2 global 1024 px", 64, 48, 6), ("tier-2 windows 1024 px", 14, 48 * 25, 6)],
    "quick": [("global 16x16", 16, 2, 12), ("windows 14x14", 14, 4, 12)],
}
# Views the fp32 reference check runs on: the bias path materialises [batch, heads, N, N] in fp32
CHECK_ELEMENTS = 2**30


_FLEX = []


def rel_pos_flex_attention(q, k, v, rel_pos_h, rel_pos_w, size):
    """The relative positions as a FlexAttention score modification: the kernel reads the two small
    per-query tables [b, heads, N, h] and [b, heads, N, w] and adds Rh[q, k // w] + Rw[q, k % w] to
    each score, so QK^T and PV stay at head dim d (the fold widens them to d + h + w). Measured
    here, not in the product: on an H100 it is 3-7x slower than the fold (bench/RESULTS.md)."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX.append(torch.compile(flex_attention))
    w = size[1]
    bias_h, bias_w = query_rel_pos_tables(q, rel_pos_h, rel_pos_w, size)

    def add_rel_pos(score, batch, head, q_idx, kv_idx):
        return score + bias_h[batch, head, q_idx, kv_idx // w] + bias_w[batch, head, q_idx, kv_idx % w]

    return _FLEX[0](q, k, v, score_mod=add_rel_pos)


def bias_path(q, k, v, rph, rpw, size):
    bias = decomposed_rel_pos_bias(q, rph, rpw, size, size)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def no_rel_pos(q, k, v, rph, rpw, size):
    return F.scaled_dot_product_attention(q, k, v) + 0 * (rph.sum() + rpw.sum())  # the tables get (zero) grads


def with_backend(fn, backend):
    """``fn`` with SDPA held to one kernel family (the fold's wide head: cuDNN's or flash's backward)."""
    from torch.nn.attention import sdpa_kernel

    def run(*args):
        with sdpa_kernel([backend]):
            return fn(*args)

    return run


def with_launch(fn, block_m: int, num_warps: int):
    """``fn`` with model.relpos_attention's launch settings changed for the call."""
    import model.relpos_attention as kernel

    def run(*args):
        saved = kernel.BLOCK_M, kernel.NUM_WARPS
        kernel.BLOCK_M, kernel.NUM_WARPS = block_m, num_warps
        try:
            return fn(*args)
        finally:
            kernel.BLOCK_M, kernel.NUM_WARPS = saved

    return run


def paths() -> dict:
    from torch.nn.attention import SDPBackend

    return {"bias": bias_path, "fold": rel_pos_flash_attention, "flex": rel_pos_flex_attention, "none": no_rel_pos,
            "triton": rel_pos_triton_attention,
            "triton-m128": with_launch(rel_pos_triton_attention, 128, 8),
            "triton-m64w8": with_launch(rel_pos_triton_attention, 64, 8),
            "fold-cudnn": with_backend(rel_pos_flash_attention, SDPBackend.CUDNN_ATTENTION),
            "fold-flash": with_backend(rel_pos_flash_attention, SDPBackend.FLASH_ATTENTION),
            "fold-efficient": with_backend(rel_pos_flash_attention, SDPBackend.EFFICIENT_ATTENTION),
            "fold-narrow-v": narrow_v,
            "fold-narrow-v-cudnn": with_backend(narrow_v, SDPBackend.CUDNN_ATTENTION),
            "fold-narrow-v-efficient": with_backend(narrow_v, SDPBackend.EFFICIENT_ATTENTION)}


def narrow_v(q, k, v, rph, rpw, size):
    """The fold with v at its own head dim (``NANO_OCR_SAM_GLOBAL_ATTENTION=fold-narrow-v``)."""
    return rel_pos_flash_attention(q, k, v, rph, rpw, size, narrow_v=True)


def inputs(side: int, batch: int, heads: int, device, dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = side * side

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(True)

    # rel-pos tables at a trained scale (SAM's are ~0.1-1), so the bias matters in the check
    return [t(batch, heads, n, HEAD_DIM), t(batch, heads, n, HEAD_DIM), t(batch, heads, n, HEAD_DIM),
            t(2 * side - 1, HEAD_DIM, scale=0.5), t(2 * side - 1, HEAD_DIM, scale=0.5)]


def run_path(fn, xs, size, backward: bool):
    out = fn(*xs, size)
    if not backward:
        return out, None
    grads = torch.autograd.grad(out.float().square().mean(), xs)
    return out, grads


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--paths", default="bias,fold,triton,flex,none")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--shapes", choices=sorted(SHAPES), default="bench", help="--quick means 'quick'")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("sam_attention.py needs CUDA: the fold and flex paths are CUDA paths")
    chosen = [x for x in args.paths.split(",") if x]
    rows, raw = [], []
    for label, side, batch, heads in SHAPES["quick" if args.quick else args.shapes]:
        size = (side, side)
        shape = f"{batch} x {heads} x {side * side}"
        xs = inputs(side, batch, heads, device, torch.bfloat16, args.seed)
        n_check = max(1, min(batch, CHECK_ELEMENTS // (heads * side**4)))
        check_xs = [x.detach()[:n_check].requires_grad_(True) for x in xs[:3]] + xs[3:]
        ref_out, ref_grads = run_path(bias_path, [x.detach().float().requires_grad_(True) for x in check_xs], size,
                                      True)
        torch.cuda.reset_peak_memory_stats(device)  # a path's peak counts its own work, not the fp32 reference's
        fold_fb = None
        for name in chosen:
            fn = paths()[name]
            try:
                out, grads = run_path(fn, check_xs, size, True)
            except Exception as exc:  # e.g. no SDPA kernel of that family, a Triton launch out of resources
                print(f"{label} {name}: {str(exc)[:200]}", flush=True)
                rows.append([label, shape, name, "n/a", "n/a", "-", "-", "-"])
                continue
            if name == "none":
                err = "-"  # a different function: the floor
            else:
                errs = [rel_err(out, ref_out)] + [rel_err(a, b) for a, b in zip(grads, ref_grads)]
                err = f"{max(errs):.1e}"
            del out, grads
            fwd = median(timed(lambda: run_path(fn, xs, size, False), device, repeat=args.repeat, warmup=2))
            fb = median(timed(lambda: run_path(fn, xs, size, True), device, repeat=args.repeat, warmup=2))
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
            if name == "fold":
                fold_fb = fb
            vs_fold = f"{fold_fb / fb:.2f}x" if fold_fb else "-"
            rows.append([label, shape, name, fwd * 1e3, fb * 1e3, vs_fold, err, peak])
            raw.append({"shape": label, "path": name, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": fb * 1e3, "max_rel_err": err})
            print(rows[-1], flush=True)
    table = Table(
        "SAM relative-position attention paths (bench/sam_attention.py, issue 9)",
        ["blocks", "batch x heads x tokens", "path", "fwd ms", "fwd+bwd ms", "fwd+bwd vs fold", "max rel err",
         "peak GiB"],
        rows,
        ["bf16; max rel err: largest |diff| / max |ref| over the output and the five gradients (q, k, v, both "
         "tables) against the fp32 bias path", "'none' drops the relative positions: the floor, not a SAM path"],
    )
    report(table, device, args, {"rows": raw})


if __name__ == "__main__":
    main()
