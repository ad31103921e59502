"""Training and inference FLOPs of the model's parts, counted from its config and the batch's shapes.

Why: a training step's cost is mostly the vision towers (a small-preset step of 8 x 2048 tokens of
base-mode line crops is ~90% SAM + CLIP), so a utilisation counted from the GPT's tokens alone says
almost nothing; the trainer (its logged ``mfu``) and the benchmarks count both from here.
Matrix products and attention only; norms, activations and the like are left out, as is usual.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from model.config import VLMConfig


def gpt_matmul_params(cfg: VLMConfig) -> int:
    """Parameters of the GPT's matrices (blocks + lm_head; the embedding is a lookup)."""
    g = cfg.gpt
    d = g.head_dim
    per_layer = g.n_embd * d * (g.n_head + 2 * g.n_kv_head) + g.n_embd * g.n_embd + 8 * g.n_embd * g.n_embd
    return g.n_layer * per_layer + g.vocab_size * g.n_embd


def gpt_train_flops(cfg: VLMConfig, segment_lengths: Sequence[int]) -> float:
    """Training FLOPs of one packed batch: 6 * matmul params per token + causal attention
    counted per segment (what each packed sample really attends to)."""
    g = cfg.gpt
    tokens = sum(segment_lengths)
    attn = 12 * g.n_layer * g.n_head * g.head_dim * sum(s * s / 2 for s in segment_lengths)
    return 6 * gpt_matmul_params(cfg) * tokens + attn


def vision_flops(cfg: VLMConfig, size: int) -> float:
    """Forward FLOPs of one square view through SAM + compressor + CLIP + projector.

    Matrix products (linears, convolutions) and attention (QK^T and PV, plus SAM's decomposed
    relative-position terms); window blocks run on the window-padded grid as SAM does.
    """
    s, c = cfg.sam, cfg.clip
    g = size // s.patch_size
    n = g * g
    e = s.embed_dim
    hidden = int(round(e * s.mlp_ratio))
    f = 2 * n * 3 * s.patch_size ** 2 * e  # patch embedding
    for i in range(s.depth):
        if i in s.global_attn_indexes or s.window_size <= 0:
            tokens, attn_keys, side = n, n, g
        else:
            w = s.window_size
            padded = -(-g // w) * w
            tokens, attn_keys, side = padded * padded, w * w, w
        f += 2 * tokens * e * 3 * e + 2 * tokens * e * e  # qkv, proj
        f += 4 * tokens * attn_keys * e  # QK^T, PV
        f += 2 * 2 * tokens * side * e  # relative positions, both axes
        f += 2 * 2 * n * e * hidden  # MLP
    f += 2 * n * e * s.neck_dim + 2 * n * 9 * s.neck_dim ** 2  # neck
    f += 2 * (n // 4) * 9 * s.neck_dim * s.net2_dim + 2 * (n // 16) * 9 * s.net2_dim * s.net3_dim  # compressor
    m = n // 16 + 1  # CLIP tokens (CLS + compressed grid)
    f += c.num_layers * (2 * m * c.hidden_size * 4 * c.hidden_size + 2 * 2 * m * c.hidden_size * c.ffn_hidden_size
                         + 4 * m * m * c.hidden_size)
    f += 2 * (n // 16) * cfg.projector_in * cfg.gpt.n_embd  # projector
    return float(f)


def image_flops(cfg: VLMConfig, views, view_flops: Callable[[int], float] | None = None) -> float:
    """Forward FLOPs of all views of one image; ``view_flops(size)`` (default: :func:`vision_flops`)
    lets a caller that counts many images reuse each size's count."""
    view_flops = view_flops or functools.partial(vision_flops, cfg)
    f = view_flops(views.global_view.shape[-1])
    if views.tiles.shape[0]:
        f += views.tiles.shape[0] * view_flops(views.tiles.shape[-1])
    return f


def segment_lengths(segment_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed samples in [B, T] segment ids (-1 = padding), row by row."""
    out = []
    for row in segment_ids:
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        out += [int(c) for i, c in zip(ids.tolist(), counts.tolist()) if i >= 0]
    return out


def packed_train_flops(cfg: VLMConfig, images: Sequence, segment_ids: torch.Tensor) -> float:
    """Forward + backward FLOPs of one packed batch: 3x the views' forward and the GPT's training FLOPs.

    ``images`` are the batch's views (``global_view`` [3, S, S], ``tiles`` [N, 3, t, t]) and
    ``segment_ids`` its [B, T] segment ids, on the host as the trainer keeps them. Counts a stage
    where everything trains (stage 1); with SAM and the compressor frozen (stage 2) their backward is
    counted too, so the estimate runs high there.
    """
    view_flops = functools.cache(functools.partial(vision_flops, cfg))  # a step's views come in few sizes
    vision = sum(image_flops(cfg, im, view_flops) for im in images)
    return 3 * vision + gpt_train_flops(cfg, segment_lengths(segment_ids))
