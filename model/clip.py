"""CLIP ViT encoder that can take SAM's compressed features as its patch embeddings.

Parameter names mirror DeepSeek-OCR's released checkpoint under ``model.vision_model.``
(fused ``qkv_proj``, ``pre_layrnorm`` spelled as in CLIP, no post-layernorm). The output keeps
the CLS token first; the VLM drops it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.config import CLIPConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def resize_clip_pos(table: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """[1 + g*g, C] position table -> [1 + h*w, C]: CLS row kept, grid resized bicubic-antialias (fp32)."""
    if tuple(size) == (grid, grid):
        return table
    cls_pos, grid_pos = table[:1], table[1:]
    dim = table.shape[-1]
    grid_pos = grid_pos.reshape(1, grid, grid, dim).permute(0, 3, 1, 2).float()
    grid_pos = F.interpolate(grid_pos, size=size, mode="bicubic", antialias=True, align_corners=False)
    grid_pos = grid_pos.to(table.dtype).permute(0, 2, 3, 1).reshape(size[0] * size[1], dim)
    return torch.cat([cls_pos, grid_pos], dim=0)


class CLIPEmbeddings(nn.Module):
    """CLS token + patch embeddings (conv, or given) + resized absolute positions."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.grid = cfg.pos_grid
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * cfg.hidden_size**-0.5)
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.grid * self.grid + 1, cfg.hidden_size)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        b, _, h, w = patch_embeds.shape
        x = patch_embeds.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + resize_clip_pos(self.position_embedding.weight, self.grid, (h, w)).to(x.dtype)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CLIP hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, dim * 3, bias=True)  # rows: q, k, v
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_proj(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPEncoder(nn.Module):
    """CLIP ViT: pixels or patch embeddings [B, C, h, w] -> tokens [B, 1 + h*w, C] (CLS first)."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.transformer = CLIPTransformer(cfg)

    def _patchify(self, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        if pixel_values is None:
            raise ValueError("CLIPEncoder needs pixel_values or patch_embeds; got neither")
        shape = tuple(pixel_values.shape)
        p = self.cfg.patch_size
        if pixel_values.dim() != 4 or shape[1] != 3:
            raise ValueError(f"CLIP expects pixel_values [B, 3, H, W]; got shape {shape}")
        if shape[2] % p or shape[3] % p or shape[2] == 0 or shape[3] == 0:
            raise ValueError(f"CLIP expects H and W to be positive multiples of patch {p}; got shape {shape}")
        return self.embeddings.patch_embedding(pixel_values)

    def forward(
        self, pixel_values: Optional[torch.Tensor], patch_embeds: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """When patch_embeds [B, C, h, w] is given (SAM's output), pixel_values are not used."""
        if patch_embeds is None:
            patch_embeds = self._patchify(pixel_values)
        elif patch_embeds.dim() != 4 or patch_embeds.shape[1] != self.cfg.hidden_size:
            raise ValueError(
                f"CLIP expects patch_embeds [B, {self.cfg.hidden_size}, h, w]; got shape {tuple(patch_embeds.shape)}"
            )
        x = self.pre_layrnorm(self.embeddings(patch_embeds))
        return self.transformer(x)
