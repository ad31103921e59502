"""nanochat-compatible dense GPT with an ``inputs_embeds`` path and a static KV cache.

Architecture (nanochat, Oct-Dec 2025): token embedding -> parameter-free RMSNorm -> blocks of
(pre-norm attention with RoPE then QK RMSNorm, pre-norm ReLU^2 MLP) -> RMSNorm -> untied
lm_head -> tanh logit softcap. No biases. Parameter names match nanochat's state dict
(``transformer.wte``, ``transformer.h.{i}.attn.c_q`` ..., ``lm_head``) so its checkpoints load
strictly.

Beyond nanochat: ``positions`` (per-row RoPE positions), ``segment_ids`` (block-diagonal
causal attention for packed sequences, so a packed sample sees exactly what it would see
alone) and a preallocated :class:`KVCache` with per-row lengths for batched generation of
prompts of different lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm (nanochat's ``norm``)."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on [B, T, H, D] with cos/sin [B or 1, T, 1, D/2] (nanochat's convention)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class KVCache:
    """Preallocated keys/values for every layer, with a write position per batch row.

    Layout [n_layer, B, n_kv_head, max_len, head_dim]. Rows advance independently: row ``b``
    holds valid entries at positions ``< lengths[b]``; attention masks out everything else, so
    stale values left by padding never leak.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reset_rows(self, rows: torch.Tensor | list[int]) -> None:
        """Forget rows (their slots are reused by new requests in continuous batching)."""
        self.lengths[torch.as_tensor(rows, device=self.lengths.device, dtype=torch.long)] = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None, cache: KVCache | None,
                positions: torch.Tensor | None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q), rms_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        gqa = self.n_kv_head != self.n_head
        if cache is not None:
            # write this step's keys/values at each row's own positions, then attend over the cache
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]  # [rows, Hkv, L, D]
            rows = torch.arange(B, device=x.device) if cache_rows is None else cache_rows
            index = rows[:, None].expand(B, T)
            ck[index, :, positions] = k.transpose(1, 2).to(ck.dtype)
            cv[index, :, positions] = v.transpose(1, 2).to(cv.dtype)
            if cache_rows is None:  # the whole cache is this batch: attend in place, no gather
                k, v = ck.to(q.dtype), cv.to(q.dtype)
            else:
                k, v = ck[cache_rows].to(q.dtype), cv[cache_rows].to(q.dtype)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, attn_mask, cache, positions, cache_rows=None):
        x = x + self.attn(rms_norm(x), cos, sin, attn_mask, cache, positions, cache_rows)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """nanochat's GPT; see the module docstring for the extensions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device: torch.device | None = None):
        half = torch.arange(0, self.config.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.config.rope_base ** (half / self.config.head_dim))
        freqs = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos(), freqs.sin()  # [L, D/2]

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: fan-in scaled normals, unit embeddings, zeroed output projections."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.mlp.c_proj.weight)
            nn.init.zeros_(block.attn.c_proj.weight)
        self.init_rotary()

    @torch.no_grad()
    def init_rotary(self) -> None:
        """Recompute the RoPE tables (needed after building on the meta device + ``to_empty``)."""
        if self.cos.device.type != "meta":
            cos, sin = self._rotary_tables(self.rotary_len, self.cos.device)
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(idx)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_rows: torch.Tensor | None = None,
        loss_reduction: str = "mean",
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V], or the loss when ``targets`` (ignore index -1) are given.

        ``inputs_embeds`` replaces the token embeddings (pre-norm, as ``wte`` outputs them).
        ``positions`` [B, T] default to 0..T-1 (or continue each row's cache length).
        ``segment_ids`` [B, T] restrict attention to the same segment (packed training).
        ``cache_rows`` [B] maps batch rows to KV-cache rows (prefill into free slots);
        by default batch row b is cache row b and the batch spans the whole cache.
        ``logits_rows`` [B] computes logits only at one position per row (prefill).
        """
        if inputs_embeds is None:
            if idx is None:
                raise ValueError("GPT.forward needs idx or inputs_embeds")
            inputs_embeds = self.embed(idx)
        x = inputs_embeds
        B, T, C = x.shape
        if C != self.config.n_embd:
            raise ValueError(f"inputs_embeds width {C} != n_embd {self.config.n_embd}")
        device = x.device
        if positions is None:
            if kv_cache is not None:
                base = (kv_cache.lengths if cache_rows is None else kv_cache.lengths[cache_rows])[:, None]
            else:
                base = 0
            positions = base + torch.arange(T, device=device)[None, :].expand(B, T)
        if int(positions.max()) >= self.rotary_len:
            raise ValueError(f"position {int(positions.max())} beyond the rotary table ({self.rotary_len})")
        cos = self.cos[positions][:, :, None, :].to(x.dtype)
        sin = self.sin[positions][:, :, None, :].to(x.dtype)

        attn_mask = None
        if kv_cache is not None:
            if int(positions.max()) >= kv_cache.max_len:
                raise ValueError(f"KV cache full: position {int(positions.max())} >= {kv_cache.max_len}")
            key_pos = torch.arange(kv_cache.max_len, device=device)
            attn_mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]  # [B,1,T,L]
        elif segment_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            same = segment_ids[:, :, None] == segment_ids[:, None, :]
            attn_mask = (causal[None] & same)[:, None]

        x = rms_norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, attn_mask, kv_cache, positions, cache_rows)
        x = rms_norm(x)
        if kv_cache is not None:
            new_lengths = positions.max(dim=1).values + 1
            if cache_rows is None:
                kv_cache.lengths = new_lengths
            else:
                kv_cache.lengths[cache_rows] = new_lengths
        if logits_rows is not None:
            x = x[torch.arange(B, device=device), logits_rows][:, None]
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        logits = cap * torch.tanh(logits.float() / cap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token: 6 * matmul params + attention (nanochat's estimate)."""
        cfg = self.config
        n_matmul = sum(p.numel() for n, p in self.named_parameters() if "wte" not in n)
        t = context or cfg.sequence_len
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * t
