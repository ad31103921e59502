"""SAM ViT image encoder with its neck and DeepSeek-OCR's 16x compressor (net_2, net_3).

Parameter names mirror DeepSeek-OCR's released checkpoint under ``model.sam_model.`` so that
importing it is a prefix strip. The encoder runs at any input size that is a multiple of
``patch_size * 4``: the absolute position table is resized (bicubic, antialiased) and the
relative position tables of the global blocks are interpolated, as in the reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from model.config import SAMConfig
from model.relpos_attention import relpos_attention
from model.relpos_attention import supported as relpos_supported


def resize_abs_pos(pos_embed: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a [1, G, G, C] position table to [1, h, w, C] (bicubic, antialias, in fp32).

    At the native grid the table is returned untouched, so trained weights act exactly.
    """
    if tuple(pos_embed.shape[1:3]) == tuple(size):
        return pos_embed
    table = pos_embed.permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=size, mode="bicubic", antialias=True, align_corners=False)
    return table.to(pos_embed.dtype).permute(0, 2, 3, 1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings [q_size, k_size, C] for one axis (SAM's rule).

    The table is linearly interpolated (fp32) when its length is not 2*max(q, k)-1, and the
    coordinates of the shorter side are scaled when the query and key sizes differ.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_rel_dist:
        table = rel_pos.float().t().unsqueeze(0)  # [1, C, L]
        table = F.interpolate(table, size=max_rel_dist, mode="linear")
        rel_pos = table.squeeze(0).t().to(rel_pos.dtype)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias [B, heads, qh*qw, kh*kw] from decomposed relative positions (MViTv2)."""
    (qh, qw), (kh, kw) = q_size, k_size
    rh = get_rel_pos(qh, kh, rel_pos_h)  # [qh, kh, C]
    rw = get_rel_pos(qw, kw, rel_pos_w)  # [qw, kw, C]
    b, n, _, c = q.shape
    rq = q.reshape(b, n, qh, qw, c)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, rh)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, rw)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # [b, n, qh, qw, kh, kw]
    return bias.reshape(b, n, qh * qw, kh * kw)


def query_rel_pos_tables(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                         size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's relative-position terms per key row and per key column, [b, heads, h*w, h] and
    [b, heads, h*w, w] in q's dtype: the two small tables the CUDA paths add instead of a full bias."""
    b, n, _, d = q.shape
    h, w = size
    rq = q.reshape(b, n, h, w, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, get_rel_pos(h, h, rel_pos_h).to(q.dtype)).reshape(b, n, h * w, h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, get_rel_pos(w, w, rel_pos_w).to(q.dtype)).reshape(b, n, h * w, w)
    return bias_h, bias_w


def rel_pos_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                            rel_pos_w: torch.Tensor, size: tuple[int, int], narrow_v: bool = False) -> torch.Tensor:
    """SDPA with the decomposed relative-position bias folded into the dot products (CUDA path).

    scale*q.k + Rh[q, kh] + Rw[q, kw] = [scale*q, Rh(q), Rw(q)] . [k, onehot(kh), onehot(kw)], so
    the attention runs as one unmasked SDPA call that can take a flash kernel, instead of
    materialising a [b, heads, N, N] bias (and its gradient) and using the slower masked kernel.
    Same function as the bias path; q, k, v are [b, heads, h*w, d].

    By default v is zero-padded to the widened head, since flash kernels take one head dim for q, k
    and v. ``narrow_v`` hands SDPA v at its own d instead (cuDNN on Hopper and the efficient kernel
    take a narrower v, as DeepSeek's MLA does): P @ V, its gradients and the output then cost d, not
    d + h + w (a third of them at 1024 px: 64 against 192).
    """
    b, n, _, d = q.shape
    h, w = size
    bias_h, bias_w = query_rel_pos_tables(q, rel_pos_h, rel_pos_w, size)
    width = d + h + w
    pad = -(-width // 8) * 8 - width  # flash wants head dims in multiples of 8
    eye_h = torch.eye(h, device=q.device, dtype=q.dtype).repeat_interleave(w, 0)  # key (kh, kw) -> e_kh
    eye_w = torch.eye(w, device=q.device, dtype=q.dtype).repeat(h, 1)  # key (kh, kw) -> e_kw
    qa = F.pad(torch.cat([q * d ** -0.5, bias_h, bias_w], -1), (0, pad))
    ka = F.pad(torch.cat([k, eye_h.expand(b, n, -1, -1), eye_w.expand(b, n, -1, -1)], -1), (0, pad))
    if narrow_v:
        return F.scaled_dot_product_attention(qa, ka, v, scale=1.0)
    va = F.pad(v, (0, width + pad - d))
    return F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :d]


def rel_pos_triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_pos_h: torch.Tensor,
                             rel_pos_w: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The per-query tables of the bias path, added inside a flash kernel (``model.relpos_attention``):
    QK^T and PV at head dim d instead of the fold's d + h + w. Same function as the other paths."""
    return relpos_attention(q, k, v, *query_rel_pos_tables(q, rel_pos_h, rel_pos_w, size))


# SAM's attention on CUDA (bf16/fp16), by kind of block: "fold", "fold-narrow-v" (the fold with v at
# its own head dim) or "triton" (model.relpos_attention); the CPU always takes the bias path.
# NANO_OCR_SAM_GLOBAL_ATTENTION=triton puts the global blocks on the Triton kernel: on an H100 it is
# 1.38x faster than the fold at 1024 px alone and 4% on an eager step, but a compiled step showed no
# gain yet (bench/RESULTS.md, session 20), so the fold stays the default. "fold-narrow-v" is not yet
# measured on a GPU. bench/sam_attention.py and bench/train_step.py --sam-global compare them.
SAM_ATTENTION_PATHS = ("fold", "fold-narrow-v", "triton")
CUDA_REL_POS_PATH = {"global": os.environ.get("NANO_OCR_SAM_GLOBAL_ATTENTION", "fold"), "window": "fold"}
if CUDA_REL_POS_PATH["global"] not in SAM_ATTENTION_PATHS:
    raise ValueError(f"NANO_OCR_SAM_GLOBAL_ATTENTION={CUDA_REL_POS_PATH['global']!r}; "
                     f"expected one of {', '.join(SAM_ATTENTION_PATHS)}")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a [B, C, H, W] map (weight/bias names as in SAM)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to channels-last tokens [B, H/p, W/p, C]."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class SAMAttention(nn.Module):
    """Multi-head attention with decomposed relative positions, through SDPA (or, on request, the
    Triton kernel of ``model.relpos_attention`` for global blocks)."""

    def __init__(self, dim: int, num_heads: int, rel_size: int, global_attention: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SAM embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.global_attention = global_attention
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [b, heads, h*w, head_dim]
        fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)  # the CPU keeps the bias path below
        path = CUDA_REL_POS_PATH["global" if self.global_attention else "window"]
        if fast and path == "triton" and relpos_supported(q, w):
            out = rel_pos_triton_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w))
        elif fast and q.shape[-1] + h + w <= 256:  # the fold's widened head must fit flash's 256
            out = rel_pos_flash_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w),
                                          narrow_v=path == "fold-narrow-v")
        else:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B*nw, window, window, C], zero-padding H and W up to multiples of window."""
    b, h, w, c = x.shape
    pad_h = (window - h % window) % window
    pad_w = (window - w % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> torch.Tensor:
    """Inverse of window_partition, dropping the padding."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous()


class SAMBlock(nn.Module):
    """Pre-norm transformer block; window attention when window_size > 0, else global."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window_size: int, grid: int, eps: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SAMAttention(dim, num_heads, rel_size=window_size if window_size > 0 else grid,
                                 global_attention=window_size <= 0)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x)
            x = window_unpartition(x, self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


def sam_mlp_dim(cfg: SAMConfig) -> int:
    """Hidden width of the SAM MLP (rounded so that e.g. 3072/768 ratios round-trip)."""
    return int(round(cfg.embed_dim * cfg.mlp_ratio))


class SAMEncoder(nn.Module):
    """SAM ViT + neck + compressor: [B, 3, H, W] -> [B, net3_dim, H/64, W/64] (patch 16)."""

    def __init__(self, cfg: SAMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.pos_grid
        for i in cfg.global_attn_indexes:
            if not 0 <= i < cfg.depth:
                raise ValueError(f"global_attn_indexes has {i}, outside the {cfg.depth} SAM blocks")
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        mlp_dim = sam_mlp_dim(cfg)
        self.blocks = nn.ModuleList(
            SAMBlock(
                cfg.embed_dim,
                cfg.num_heads,
                mlp_dim,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                grid=grid,
                eps=cfg.layer_norm_eps,
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.neck_dim, kernel_size=1, bias=False),
            LayerNorm2d(cfg.neck_dim, eps=cfg.layer_norm_eps),
            nn.Conv2d(cfg.neck_dim, cfg.neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.neck_dim, eps=cfg.layer_norm_eps),
        )
        self.net_2 = nn.Conv2d(cfg.neck_dim, cfg.net2_dim, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(cfg.net2_dim, cfg.net3_dim, kernel_size=3, stride=2, padding=1, bias=False)

    def _check_input(self, x: torch.Tensor) -> None:
        step = self.cfg.patch_size * 4
        shape = tuple(x.shape)
        if x.dim() != 4:
            raise ValueError(f"SAM expects images [B, 3, H, W]; got shape {shape}")
        if shape[1] != 3:
            raise ValueError(f"SAM expects 3 channels; got shape {shape}")
        if shape[2] % step or shape[3] % step or shape[2] == 0 or shape[3] == 0:
            raise ValueError(
                f"SAM expects H and W to be positive multiples of {step} (patch {self.cfg.patch_size} x 4 "
                f"for the compressor); got shape {shape}"
            )

    def forward_neck(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> neck features [B, neck_dim, H/patch, W/patch] (what HF SAM calls last_hidden_state)."""
        self._check_input(x)
        x = self.patch_embed(x)
        x = x + resize_abs_pos(self.pos_embed, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> compressed features [B, net3_dim, H/(4*patch), W/(4*patch)] (CLIP's patch embeddings)."""
        return self.net_3(self.net_2(self.forward_neck(x)))
