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

Fast paths on CUDA (CPU results are unchanged; the CPU always takes the plain SDPA path):

- packed training (``segment_ids``): FlashAttention over variable-length segments
  (``torch.nn.attention.varlen``) instead of SDPA with a dense [B,1,T,T] mask, which would
  rule flash attention out;
- prefill from position 0 into a KV cache: causal flash attention over the new keys only
  (the cache rows hold nothing older), instead of a masked pass over the whole cache;
- decoding: :class:`GraphedDecoder` runs one token for every cache row in a single CUDA-graph
  replay, with fused Triton kernels (RoPE + QK-norm + cache write; split-K flash decoding that
  reads only each row's own valid keys; residual add + RMSNorm; ReLU^2; at batch 1 a skinny
  GEMV with the norm, ReLU^2, residual add or logit softcap fused in, and RoPE, cache write,
  attention and merge in one launch; launches overlap through programmatic dependent launch on
  Hopper). Its rotary and
  attention arithmetic is fp32, so in bf16 it rounds differently from the eager path (greedy
  tokens agree except at near-ties).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.ngram import block_ngrams, push_tokens


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


@dataclass
class AttentionPlan:
    """How every layer of one forward attends (worked out once per forward, not per layer).

    ``mask``: a dense boolean mask for SDPA (KV cache, or packed segments on the CPU);
    ``cu_seqlens``/``max_seqlen``: segment boundaries over the flattened batch for varlen flash
    attention; ``causal_new``: attend causally over this call's own keys (prefill from 0).
    Everything unset: plain causal attention.
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    causal_new: bool = False


_VARLEN = None  # the resolved varlen flash-attention call; False when this torch has none


def _varlen_causal_fn():
    """torch's varlen flash attention with causal masking, across its API versions (or None)."""
    global _VARLEN
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn

            params = inspect.signature(varlen_attn).parameters
            if "is_causal" in params:
                _VARLEN = lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, is_causal=True)  # noqa: E731
            elif "window_size" in params:
                _VARLEN = lambda q, k, v, cu, m: varlen_attn(q, k, v, cu, cu, m, m, window_size=(-1, 0))  # noqa: E731
            else:
                _VARLEN = False
        except Exception:  # older torch: no varlen API
            _VARLEN = False
    return _VARLEN or None


def _half_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype flash attention would run in here (autocast's, or the tensor's own)."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    else:
        dtype = x.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def packed_plan(segment_ids: torch.Tensor, device: torch.device | None = None) -> AttentionPlan:
    """Segment boundaries of packed rows for varlen attention, on ``device``.

    Each maximal run of equal ids in a row is one sequence; rows never share a sequence. Packing
    (``pipeline.mixture.collate``) lays every sample out as one such run. Computed where
    ``segment_ids`` live: on the host that costs no device sync (on the device, one).
    """
    B, T = segment_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.flatten().nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)
    max_seqlen = int((cu[1:] - cu[:-1]).max())
    return AttentionPlan(cu_seqlens=cu.to(device or cu.device, non_blocking=True), max_seqlen=max_seqlen)


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
                plan: AttentionPlan | torch.Tensor | None, cache: KVCache | None,
                positions: torch.Tensor | None, cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(plan, AttentionPlan):  # a bare mask (or None) as before
            plan = AttentionPlan(mask=plan)
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = rms_norm(q), rms_norm(k)
        if plan.cu_seqlens is not None:  # packed segments through varlen flash attention (CUDA)
            dtype = _half_dtype(q)
            y = _varlen_causal_fn()(q.reshape(B * T, self.n_head, self.head_dim).to(dtype),
                                    k.reshape(B * T, self.n_kv_head, self.head_dim).to(dtype),
                                    v.reshape(B * T, self.n_kv_head, self.head_dim).to(dtype),
                                    plan.cu_seqlens, plan.max_seqlen)
            return self.c_proj(y.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        gqa = self.n_kv_head != self.n_head
        if cache is not None:
            # write this step's keys/values at each row's own positions, then attend over the cache
            ck, cv = cache.k[self.layer_idx], cache.v[self.layer_idx]  # [rows, Hkv, L, D]
            rows = torch.arange(B, device=x.device) if cache_rows is None else cache_rows
            index = rows[:, None].expand(B, T)
            ck[index, :, positions] = k.transpose(1, 2).to(ck.dtype)
            cv[index, :, positions] = v.transpose(1, 2).to(cv.dtype)
            if plan.causal_new:  # prefill from 0: the new keys are all the row has
                k, v = k.to(ck.dtype).to(q.dtype), v.to(cv.dtype).to(q.dtype)
            elif cache_rows is None:  # the whole cache is this batch: attend in place, no gather
                k, v = ck.to(q.dtype), cv.to(q.dtype)
            else:
                k, v = ck[cache_rows].to(q.dtype), cv[cache_rows].to(q.dtype)
        if plan.mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.mask, enable_gqa=gqa)
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

    def forward(self, x, cos, sin, plan, cache, positions, cache_rows=None):
        x = x + self.attn(rms_norm(x), cos, sin, plan, cache, positions, cache_rows)
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
        Without a KV cache, ``positions`` and ``segment_ids`` may stay on the host: what the
        forward reads from them (the largest position, segment boundaries) then costs no sync.
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
        host_pmax = None
        if positions is not None and positions.device != device and kv_cache is None:
            host_pmax = int(positions.max())
            positions = positions.to(device, non_blocking=True)
        if positions is None:
            if kv_cache is not None:
                base = (kv_cache.lengths if cache_rows is None else kv_cache.lengths[cache_rows])[:, None]
            else:
                base = 0
            positions = base + torch.arange(T, device=device)[None, :].expand(B, T)
        if kv_cache is not None and x.is_cuda and T > 1:
            # one sync for both checks: the largest position, and "prefill from position 0"
            steps = torch.arange(T, device=device)
            pmax, shifted = torch.stack([positions.max(), (positions != steps).any().long()]).tolist()
            fresh = not shifted
        else:
            pmax, fresh = host_pmax if host_pmax is not None else int(positions.max()), False
        if pmax >= self.rotary_len:
            raise ValueError(f"position {pmax} beyond the rotary table ({self.rotary_len})")
        cos = self.cos[positions][:, :, None, :].to(x.dtype)
        sin = self.sin[positions][:, :, None, :].to(x.dtype)

        plan = AttentionPlan()
        if kv_cache is not None:
            if pmax >= kv_cache.max_len:
                raise ValueError(f"KV cache full: position {pmax} >= {kv_cache.max_len}")
            if fresh:  # CUDA: causal flash attention over the new keys, no [B,1,T,L] mask
                plan = AttentionPlan(causal_new=True)
            else:
                key_pos = torch.arange(kv_cache.max_len, device=device)
                plan = AttentionPlan(mask=(key_pos[None, None, :] <= positions[:, :, None])[:, None])  # [B,1,T,L]
        elif segment_ids is not None:
            if x.is_cuda and _half_dtype(x) is not None and _varlen_causal_fn() is not None:
                plan = packed_plan(segment_ids, device)
            else:
                segment_ids = segment_ids.to(device, non_blocking=True)
                causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                plan = AttentionPlan(mask=(causal[None] & same)[:, None])

        x = rms_norm(x)
        for block in self.transformer.h:
            x = block(x, cos, sin, plan, kv_cache, positions, cache_rows)
        x = rms_norm(x)
        if kv_cache is not None:
            new_lengths = positions.max(dim=1).values + 1
            if cache_rows is None:
                kv_cache.lengths.copy_(new_lengths)  # in place: a captured decode graph holds this tensor
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

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` each transformer block's forward for training (no KV cache).

        The norms, RoPE, ReLU^2 and residual adds fuse with their neighbours, so a block keeps
        fewer activations for backward: on an H200 the full preset's stage-1 step went 327 ->
        293 ms with the vision towers compiled too (bench/train_step.py --compile-gpt). Calls
        with a KV cache (generation) keep the eager forward: they index the cache in place
        and would only add graphs to compile.
        """
        for block in self.transformer.h:
            if getattr(block.forward, "_nano_compiled", False):
                continue
            eager, compiled = block.forward, torch.compile(block.forward, backend=backend)

            def forward(x, cos, sin, plan, cache, positions, cache_rows=None, _eager=eager, _compiled=compiled):
                fn = _eager if cache is not None else _compiled
                return fn(x, cos, sin, plan, cache, positions, cache_rows)

            forward._nano_compiled = True
            block.forward = forward

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------
# Decode fast path: one token for every KV-cache row per call, as fused kernels in a CUDA graph.
# Each op has a torch reference (used on the CPU and wherever Triton is missing) that computes
# what the eager GPT.forward computes, so the two are interchangeable and testable on a laptop.

try:  # Triton ships with CUDA builds of torch; the CPU wheels lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def rope_norm_store_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int) -> torch.Tensor:
    """q [B, H, D] rotated and normed; k (rotated, normed) and v written to the caches at ``pos``.

    ``qkv`` is [B, (H + 2 Hkv) D] (c_q, c_k, c_v outputs side by side); caches [B, Hkv, L, D].
    """
    B = qkv.shape[0]
    n_kv, D = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.split([n_head * D, n_kv * D, n_kv * D], dim=-1)
    c, s = cos[pos][:, None, :].to(qkv.dtype), sin[pos][:, None, :].to(qkv.dtype)
    q = rms_norm(apply_rotary(q.reshape(B, n_head, D), c, s))
    k = rms_norm(apply_rotary(k.reshape(B, n_kv, D), c, s))
    rows = torch.arange(B, device=qkv.device)
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.reshape(B, n_kv, D).to(v_cache.dtype)
    return q


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         n_keys: torch.Tensor) -> torch.Tensor:
    """[B, H*D]: each row's query over its first ``n_keys[b]`` cached keys (the eager masking)."""
    B, H, D = q.shape
    L = k_cache.shape[2]
    mask = (torch.arange(L, device=q.device)[None, :] < n_keys[:, None])[:, None, None, :]
    y = F.scaled_dot_product_attention(q[:, :, None], k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=mask,
                                       enable_gqa=k_cache.shape[1] != H)
    return y.reshape(B, H * D)


def add_rms_norm_ref(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x += y in place; returns (x, rms_norm(x))."""
    x.add_(y)
    return x, rms_norm(x)


def relu_square_ref(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def step_inputs_ref(tokens: torch.Tensor, active: torch.Tensor, lengths: torch.Tensor, wte: torch.Tensor,
                    pos: torch.Tensor, n_keys: torch.Tensor, max_len: int) -> torch.Tensor:
    """A decode step's start: each row's position into ``pos``, ``pos + 1`` into ``n_keys`` (in
    place), and the normed embedding of each row's token, [B, C].

    Idle rows, and rows already at the cache's end (a step the host launched ahead for a row that
    has finished), compute a throwaway token at position 0 instead of writing past the cache.
    """
    torch.mul(lengths, active & (lengths < max_len), out=pos)
    torch.add(pos, 1, out=n_keys)
    return rms_norm(F.embedding(tokens, wte))


def greedy_advance_ref(logits: torch.Tensor, active: torch.Tensor, greedy: torch.Tensor, tokens: torch.Tensor,
                       lengths: torch.Tensor) -> None:
    """A decode step's end, in place: the argmax of each row's logits into ``greedy`` and
    ``tokens`` (the next step's input), and the active rows' lengths advanced by one."""
    torch.argmax(logits, dim=-1, out=greedy)
    tokens.copy_(greedy)
    lengths.add_(active)


EPILOGUES = ("none", "relu2", "residual", "softcap")


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, norm_input: bool = False, epilogue: str = "none",
                      out: torch.Tensor | None = None, cap: float = 0.0) -> torch.Tensor:
    """``epilogue(F.linear(rms_norm(x) if norm_input else x, w))``, the eager way.

    Epilogues: ``relu2`` squares the ReLU; ``residual`` adds the product into ``out`` in place
    (the residual stream); ``softcap`` writes ``cap * tanh(y / cap)`` in fp32 into ``out``.
    """
    h = rms_norm(x) if norm_input else x
    y = F.linear(h, w)
    if epilogue == "relu2":
        return relu_square_ref(y)
    if epilogue == "residual":
        return out.add_(y)
    if epilogue == "softcap":
        return out.copy_(cap * torch.tanh(y.float() / cap))
    if epilogue != "none":
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    return y


if triton is not None:

    @triton.jit
    def _after_previous(PDL: tl.constexpr):
        """Programmatic dependent launch: wait until the kernel before has finished (and its
        writes are visible), then let the next kernel start launching. A no-op without PDL."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _last_to_arrive(COUNTER, n):
        """Whether this program is the last of ``n`` to reach this point (after storing its partial):
        a ticket from an atomic counter. The last one merges the partials and resets the counter
        to 0 for the next launch."""
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        return tl.atomic_add(COUNTER, 1, sem="acq_rel") == n - 1

    @triton.jit
    def _rotate_norm(src, c, s, i, eps, HALF: tl.constexpr):
        """RoPE (rotate-half) then RMSNorm of one head vector at ``src``, as two fp32 halves."""
        x1 = tl.load(src + i).to(tl.float32)
        x2 = tl.load(src + HALF + i).to(tl.float32)
        o1 = x1 * c + x2 * s
        o2 = x2 * c - x1 * s
        r = 1.0 / tl.sqrt((tl.sum(o1 * o1, 0) + tl.sum(o2 * o2, 0)) / (2 * HALF) + eps)
        return o1 * r, o2 * r

    @triton.jit
    def _merge_splits(MOUT, LOUT, AOUT, base, n_split, D: tl.constexpr, NSPLIT_P2: tl.constexpr):
        """The attention output [D] of one (row, head) from its split-K partials at ``base``
        (read from L2: other programs wrote them)."""
        sp = tl.arange(0, NSPLIT_P2)
        ok = sp < n_split
        d = tl.arange(0, D)
        m = tl.load(MOUT + base + sp, mask=ok, other=-float("inf"), cache_modifier=".cg")
        lw = tl.load(LOUT + base + sp, mask=ok, other=0.0, cache_modifier=".cg")
        acc = tl.load(AOUT + (base + sp)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0,
                      cache_modifier=".cg")
        w = tl.exp2(m - tl.max(m, 0))  # split 0 always holds key 0, so the max is finite
        return tl.sum(acc * w[:, None], 0) / tl.sum(lw * w, 0)

    @triton.jit
    def _rope_norm_store_kernel(QKV, COS, SIN, POS, QOUT, KC, VC,
                                s_qkv, s_qo_b, s_qo_h, s_c_b, s_c_h, s_c_t, eps,
                                H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
        _after_previous(PDL)
        b = tl.program_id(0)
        j = tl.program_id(1)  # q heads, then k heads, then v heads
        half = tl.arange(0, D // 2)
        pos = tl.load(POS + b)
        src = QKV + b * s_qkv + j * D
        if j < H + HKV:
            c = tl.load(COS + pos * (D // 2) + half).to(tl.float32)
            s = tl.load(SIN + pos * (D // 2) + half).to(tl.float32)
            o1, o2 = _rotate_norm(src, c, s, half, eps, D // 2)
            if j < H:
                dst = QOUT + b * s_qo_b + j * s_qo_h
                tl.store(dst + half, o1.to(QOUT.dtype.element_ty))
                tl.store(dst + D // 2 + half, o2.to(QOUT.dtype.element_ty))
            else:
                dst = KC + b * s_c_b + (j - H) * s_c_h + pos * s_c_t
                tl.store(dst + half, o1.to(KC.dtype.element_ty))
                tl.store(dst + D // 2 + half, o2.to(KC.dtype.element_ty))
        else:
            full = tl.arange(0, D)
            dst = VC + b * s_c_b + (j - H - HKV) * s_c_h + pos * s_c_t
            tl.store(dst + full, tl.load(src + full).to(VC.dtype.element_ty))

    @triton.jit
    def _decode_attn_split_kernel(Q, KC, VC, NKEYS, MOUT, LOUT, AOUT,
                                  s_q_b, s_q_h, s_c_b, s_c_h, s_c_t, scale_log2, n_split,
                                  H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                                  SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        _after_previous(PDL)
        # flash decoding: program (b, h, s) reduces keys [s*SPLIT, min((s+1)*SPLIT, n_b)) to a
        # partial (max, sum, weighted values); splits past a row's length do no loads at all
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        n = tl.load(NKEYS + b)
        start = sp * SPLIT
        end = tl.minimum(start + SPLIT, n)
        d = tl.arange(0, D)
        q = tl.load(Q + b * s_q_b + h * s_q_h + d).to(tl.float32) * scale_log2
        kv = b * s_c_b + (h // GROUP) * s_c_h
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([D], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            valid = t < end
            offs = kv + t[:, None] * s_c_t + d[None, :]
            k = tl.load(KC + offs, mask=valid[:, None], other=0.0)
            v = tl.load(VC + offs, mask=valid[:, None], other=0.0)  # issued with K: more bytes in flight
            scores = tl.where(valid, tl.sum(k.to(tl.float32) * q[None, :], 1), -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 0))
            p = tl.exp2(scores - m_new)
            alpha = tl.exp2(m_i - m_new)
            v = v.to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
        o = (b * H + h) * n_split + sp
        tl.store(MOUT + o, m_i)
        tl.store(LOUT + o, l_i)
        tl.store(AOUT + o * D + d, acc)

    @triton.jit
    def _kv_tile(KC, VC, kv, t, limit, s_c_t, i, HALF: tl.constexpr):
        """Keys and values at positions ``t`` (< limit), as two halves of the head dimension."""
        valid = t < limit
        offs = kv + t[:, None] * s_c_t + i[None, :]
        k1 = tl.load(KC + offs, mask=valid[:, None], other=0.0)
        k2 = tl.load(KC + offs + HALF, mask=valid[:, None], other=0.0)
        v1 = tl.load(VC + offs, mask=valid[:, None], other=0.0)
        v2 = tl.load(VC + offs + HALF, mask=valid[:, None], other=0.0)
        return valid, k1, k2, v1, v2

    @triton.jit
    def _attend(q1, q2, valid, k1, k2, v1, v2, m_i, l_i, acc1, acc2):
        """One online-softmax update (log2 domain) with a tile of keys and values."""
        scores = tl.sum(k1.to(tl.float32) * q1[None, :], 1) + tl.sum(k2.to(tl.float32) * q2[None, :], 1)
        scores = tl.where(valid, scores, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        p = tl.exp2(scores - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc1 = acc1 * alpha + tl.sum(p[:, None] * v1.to(tl.float32), 0)
        acc2 = acc2 * alpha + tl.sum(p[:, None] * v2.to(tl.float32), 0)
        return m_new, l_i, acc1, acc2

    @triton.jit
    def _rope_attn_split_kernel(QKV, COS, SIN, NKEYS, KC, VC, MOUT, LOUT, AOUT, COUNT, OUT,
                                s_qkv, s_c_b, s_c_h, s_c_t, s_o_b, scale_log2, eps, n_split,
                                H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr,
                                BLOCK_N: tl.constexpr, NSPLIT_P2: tl.constexpr, PDL: tl.constexpr):
        # _rope_norm_store_kernel and _decode_attn_split_kernel in one launch. Program (b, h, s)
        # covers keys [s*SPLIT, min((s+1)*SPLIT, n_b)). Keys before the new position were written
        # by earlier steps, so (PDL) the first tile of them is requested before waiting on the
        # kernel that produced qkv. Each program rotates and norms its own query from qkv; the
        # split that holds the new position does the same for the new key, attends to it
        # directly and (one program per KV head) writes it and its value into the cache.
        # Vectors are handled as two halves (RoPE's rotate-half pairs element i with i + D/2).
        # The merge needs no launch of its own: the last split of (b, h) to finish (a ticket from
        # an atomic counter, which it then resets for the next step) merges all splits into OUT.
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.program_id(2)
        GROUP: tl.constexpr = H // HKV
        HALF: tl.constexpr = D // 2
        n = tl.load(NKEYS + b)  # written at the start of the step, long before this kernel
        pos = n - 1
        start = sp * SPLIT
        end = tl.minimum(start + SPLIT, n)
        old_end = tl.minimum(end, pos)  # keys [start, old_end) come from earlier steps
        i = tl.arange(0, HALF)
        kvh = h // GROUP
        kv = b * s_c_b + kvh * s_c_h
        first = _kv_tile(KC, VC, kv, start + tl.arange(0, BLOCK_N), old_end, s_c_t, i, HALF)
        c = tl.load(COS + pos * HALF + i).to(tl.float32)  # the tables never change: read before waiting too
        s = tl.load(SIN + pos * HALF + i).to(tl.float32)
        _after_previous(PDL)
        q1, q2 = _rotate_norm(QKV + b * s_qkv + h * D, c, s, i, eps, HALF)
        q1 = q1.to(KC.dtype.element_ty).to(tl.float32) * scale_log2  # rounded as a stored q is
        q2 = q2.to(KC.dtype.element_ty).to(tl.float32) * scale_log2
        m_i = tl.full([], -float("inf"), tl.float32)
        l_i = tl.zeros([], tl.float32)
        acc1 = tl.zeros([HALF], dtype=tl.float32)
        acc2 = tl.zeros([HALF], dtype=tl.float32)
        if start < old_end:
            valid, k1, k2, v1, v2 = first
            m_i, l_i, acc1, acc2 = _attend(q1, q2, valid, k1, k2, v1, v2, m_i, l_i, acc1, acc2)
        for t0 in range(start + BLOCK_N, old_end, BLOCK_N):
            valid, k1, k2, v1, v2 = _kv_tile(KC, VC, kv, t0 + tl.arange(0, BLOCK_N), old_end, s_c_t, i, HALF)
            m_i, l_i, acc1, acc2 = _attend(q1, q2, valid, k1, k2, v1, v2, m_i, l_i, acc1, acc2)
        if (pos >= start) & (pos < end):  # this split holds the new key
            e1, e2 = _rotate_norm(QKV + b * s_qkv + (H + kvh) * D, c, s, i, eps, HALF)
            kn1 = e1.to(KC.dtype.element_ty)
            kn2 = e2.to(KC.dtype.element_ty)
            vsrc = QKV + b * s_qkv + (H + HKV + kvh) * D
            vn1 = tl.load(vsrc + i).to(VC.dtype.element_ty)
            vn2 = tl.load(vsrc + HALF + i).to(VC.dtype.element_ty)
            if h % GROUP == 0:
                dst = kv + pos * s_c_t + i
                tl.store(KC + dst, kn1)
                tl.store(KC + dst + HALF, kn2)
                tl.store(VC + dst, vn1)
                tl.store(VC + dst + HALF, vn2)
            score = tl.sum(kn1.to(tl.float32) * q1, 0) + tl.sum(kn2.to(tl.float32) * q2, 0)
            m_new = tl.maximum(m_i, score)
            p = tl.exp2(score - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + p
            acc1 = acc1 * alpha + p * vn1.to(tl.float32)
            acc2 = acc2 * alpha + p * vn2.to(tl.float32)
            m_i = m_new
        o = (b * H + h) * n_split + sp
        tl.store(MOUT + o, m_i)
        tl.store(LOUT + o, l_i)
        tl.store(AOUT + o * D + i, acc1)
        tl.store(AOUT + o * D + HALF + i, acc2)
        if _last_to_arrive(COUNT + b * H + h, n_split):
            out = _merge_splits(MOUT, LOUT, AOUT, (b * H + h) * n_split, n_split, D, NSPLIT_P2)
            tl.store(OUT + b * s_o_b + h * D + tl.arange(0, D), out.to(OUT.dtype.element_ty))
            tl.atomic_xchg(COUNT + b * H + h, 0)

    @triton.jit
    def _step_inputs_kernel(TOKENS, ACTIVE, LENGTHS, WTE, X, POS, NKEYS, s_w, s_x, eps, max_len,
                            C: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        # step_inputs_ref in one launch, one program per row. With PDL the next kernel (the first
        # layer's products) starts streaming its weights while this one runs.
        _after_previous(PDL)
        b = tl.program_id(0)
        length = tl.load(LENGTHS + b)
        pos = tl.where(tl.load(ACTIVE + b) & (length < max_len), length, 0)
        tl.store(POS + b, pos)
        tl.store(NKEYS + b, pos + 1)
        c = tl.arange(0, BLOCK)
        ok = c < C
        e = tl.load(WTE + tl.load(TOKENS + b) * s_w + c, mask=ok, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(e * e, 0) / C + eps)
        tl.store(X + b * s_x + c, (e * r).to(X.dtype.element_ty), mask=ok)

    @triton.jit
    def _greedy_advance_kernel(LOGITS, ACTIVE, LENGTHS, GREEDY, TOKENS, PMAX, PIDX, COUNT, V, s_l, n_chunks,
                               CHUNK: tl.constexpr, NCHUNK_P2: tl.constexpr, PDL: tl.constexpr):
        # greedy_advance_ref in one launch: program (b, c) finds the first maximum of chunk c of row
        # b's logits; the last chunk of a row to finish (a ticket, as in the attention merge) picks
        # the row's token from the chunks' maxima and advances the row. NaN counts as the largest
        # value, as in torch.argmax, so a broken row still yields a valid token id.
        _after_previous(PDL)
        b = tl.program_id(0)
        ch = tl.program_id(1)
        i = ch * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(LOGITS + b * s_l + i, mask=i < V, other=-float("inf"))
        x = tl.where(x != x, float("inf"), x)
        m = tl.max(x, 0)
        tl.store(PMAX + b * n_chunks + ch, m)
        tl.store(PIDX + b * n_chunks + ch, tl.min(tl.where(x == m, i, V), 0))
        if _last_to_arrive(COUNT + b, n_chunks):
            c = tl.arange(0, NCHUNK_P2)
            ok = c < n_chunks
            pm = tl.load(PMAX + b * n_chunks + c, mask=ok, other=-float("inf"), cache_modifier=".cg")
            pi = tl.load(PIDX + b * n_chunks + c, mask=ok, other=V, cache_modifier=".cg")
            token = tl.min(tl.where(pm == tl.max(pm, 0), pi, V), 0).to(tl.int64)
            tl.store(GREEDY + b, token)
            tl.store(TOKENS + b, token)
            tl.store(LENGTHS + b, tl.load(LENGTHS + b) + tl.load(ACTIVE + b).to(tl.int64))
            tl.atomic_xchg(COUNT + b, 0)

    @triton.jit
    def _decode_attn_merge_kernel(MOUT, LOUT, AOUT, OUT, s_o_b, n_split,
                                  H: tl.constexpr, D: tl.constexpr, NSPLIT_P2: tl.constexpr, PDL: tl.constexpr):
        _after_previous(PDL)
        bh = tl.program_id(0)
        out = _merge_splits(MOUT, LOUT, AOUT, bh * n_split, n_split, D, NSPLIT_P2)
        tl.store(OUT + (bh // H) * s_o_b + (bh % H) * D + tl.arange(0, D), out.to(OUT.dtype.element_ty))

    @triton.jit
    def _add_rms_norm_kernel(X, Y, HOUT, s_x, s_y, s_h, eps, C: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        ok = c < C
        x = tl.load(X + b * s_x + c, mask=ok, other=0.0).to(tl.float32)
        x = x + tl.load(Y + b * s_y + c, mask=ok, other=0.0).to(tl.float32)
        x = x.to(X.dtype.element_ty)  # the residual stream is stored rounded, as eagerly
        tl.store(X + b * s_x + c, x, mask=ok)
        xf = x.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / C + eps)
        tl.store(HOUT + b * s_h + c, (xf * r).to(HOUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _relu_square_kernel(X, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        x = tl.maximum(tl.load(X + i, mask=ok, other=0.0).to(tl.float32), 0.0)
        tl.store(X + i, (x * x).to(X.dtype.element_ty), mask=ok)

    @triton.jit
    def _skinny_linear_kernel(X, W, Y, s_x, s_w, s_y, N, eps, cap,
                              B: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                              NORM: tl.constexpr, EPILOGUE: tl.constexpr,
                              BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        # y[b, n] = epilogue(sum_k x'[b, k] w[n, k]) for a few rows b. Each program holds BLOCK_N
        # whole rows of W (K padded to the power of two KP) in registers: all of its loads go out
        # at once, and they are issued before waiting on the previous kernel (PDL: the weights
        # never change), so weight streaming overlaps the previous kernel's tail. Every row b then
        # reuses the tile, so the weights are read once per step. x' is rms_norm(x) (NORM; each
        # program recomputes the row norm, which is cheaper than a launch) rounded to x's dtype,
        # as the eager path stores it. EPILOGUE: 0 store, 1 relu^2, 2 add into Y (the residual
        # stream, in place), 3 cap * tanh(y / cap) in fp32 (the logit softcap).
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        k = tl.arange(0, KP)
        k_ok = k < K
        w = tl.load(W + n[:, None] * s_w + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        _after_previous(PDL)
        for b in tl.static_range(B):
            x = tl.load(X + b * s_x + k, mask=k_ok, other=0.0)
            if EPILOGUE == 2:  # requested with x, so both loads are in flight together
                res = tl.load(Y + b * s_y + n, mask=n_ok, other=0.0).to(tl.float32)
            if NORM:
                xf = x.to(tl.float32)
                x = (xf / tl.sqrt(tl.sum(xf * xf, 0) / K + eps)).to(X.dtype.element_ty)
            y = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], 1)
            y = y.to(W.dtype.element_ty).to(tl.float32)  # the product rounded, as a bf16 matmul returns it
            if EPILOGUE == 1:
                y = tl.maximum(y, 0.0)
                y = y * y
            elif EPILOGUE == 2:
                y = res + y
            elif EPILOGUE == 3:
                z = tl.exp(2.0 * y / cap)  # tanh(y / cap) = 1 - 2 / (exp(2 y / cap) + 1), exact at +-inf
                y = cap * (1.0 - 2.0 / (z + 1.0))
            tl.store(Y + b * s_y + n, y.to(Y.dtype.element_ty), mask=n_ok)


def _attention_config(env_name: str, block_n: int, num_warps: int, max_split: int) -> dict[str, int]:
    """Split-K decode attention launch settings; ``<env_name>=block_n,num_warps,max_split``
    overrides them (tuning on a new GPU)."""
    config = {"block_n": block_n, "num_warps": num_warps, "max_split": max_split}
    env = os.environ.get(env_name)
    if env:
        config.update(zip(("block_n", "num_warps", "max_split"), (int(v) for v in env.split(","))))
    return config


# Several rows: the best of `bench/decode.py --sweep` at batch 128. One row: the best inside a whole
# batch-1 step (`bench/decode.py --tune-in-step`, H200): two warps' cheaper reductions and twice the
# splits shorten the chain of dependent steps in each program (3% of the step).
DECODE_ATTENTION = _attention_config("NANO_OCR_DECODE_ATTN", 64, 4, 512)
DECODE_ATTENTION_ONE_ROW = _attention_config("NANO_OCR_DECODE_ATTN_ONE_ROW", 32, 2, 512)


def attention_launch(batch: int) -> dict[str, int]:
    """The split-K attention launch settings for a cache of ``batch`` rows."""
    return DECODE_ATTENTION_ONE_ROW if batch == 1 else DECODE_ATTENTION

# Decoding a single row reads every weight matrix once per token for one vector: cuBLAS's GEMV
# runs these 3-13 MB matrices well below copy bandwidth and leaves the norms, activations and
# residual adds to separate launches. Up to ``max_batch`` cache rows (1: at 2 and 4 rows the
# whole-row tiles spill and cuBLAS is faster) the decoder uses the fused skinny GEMV instead.
# ``NANO_OCR_DECODE_GEMV=max_batch`` overrides (0 turns it off); ``NANO_OCR_DECODE_PDL=0`` turns
# programmatic dependent launch off for every decode kernel.
DECODE_GEMV = {"max_batch": int(os.environ.get("NANO_OCR_DECODE_GEMV", "1")),
               "pdl": os.environ.get("NANO_OCR_DECODE_PDL", "1") != "0"}


# (N, K) -> (BLOCK_N, num_warps): the full preset's decode products, the best of
# `bench/decode.py --gemv-sweep 1` on an H200 (one weight read per call, calls back to back).
SKINNY_TUNED = {(3840, 1280): (8, 4), (1280, 1280): (8, 4), (5120, 1280): (4, 2), (1280, 5120): (2, 4),
                (65536, 1280): (4, 2)}


def skinny_launch(batch: int, n: int, k: int, sm_count: int = 132) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for the skinny GEMV: the tuned entry for this shape, else a program
    holds BLOCK_N whole weight rows, 16384 elements (many loads in flight per thread), with at
    least ~2 programs per SM."""
    if (n, k) in SKINNY_TUNED:
        return SKINNY_TUNED[(n, k)]
    kp = _next_pow2(k)
    block_n = 16
    while block_n > 1 and (block_n * kp > 16384 or -(-n // block_n) < 2 * sm_count):
        block_n //= 2
    return block_n, 2 if block_n * kp <= 16384 else 8


def _pdl_launch(pdl: bool) -> dict[str, bool]:
    """Triton launch options for programmatic dependent launch (none when off, for Tritons
    that predate the option)."""
    return {"launch_pdl": True} if pdl else {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (an H100's 132 where there is no GPU: Triton's interpreter)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def _norm_eps(dtype: torch.dtype) -> float:
    """The eps F.rms_norm uses when given none: the input dtype's machine epsilon."""
    return torch.finfo(dtype).eps


class DecodeKernels:
    """The decode step's fused ops: Triton kernels, or their torch references (``use_triton=False``)."""

    def __init__(self, use_triton: bool, pdl: bool | None = None) -> None:
        if use_triton and triton is None:
            raise RuntimeError("Triton is not installed; use the torch reference ops")
        self.use_triton = use_triton
        # programmatic dependent launch: Hopper and newer (a kernel's prologue overlaps the last one's tail)
        self.pdl = (use_triton and DECODE_GEMV["pdl"] and torch.cuda.is_available()
                    and torch.cuda.get_device_capability()[0] >= 9) if pdl is None else pdl

    def rope_norm_store(self, qkv, cos, sin, pos, k_cache, v_cache, n_head):
        if not self.use_triton:
            return rope_norm_store_ref(qkv, cos, sin, pos, k_cache, v_cache, n_head)
        B = qkv.shape[0]
        n_kv, D = k_cache.shape[1], k_cache.shape[3]
        q = torch.empty(B, n_head, D, device=qkv.device, dtype=qkv.dtype)
        _rope_norm_store_kernel[(B, n_head + 2 * n_kv)](
            qkv, cos, sin, pos, q, k_cache, v_cache, qkv.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), _norm_eps(qkv.dtype),
            H=n_head, HKV=n_kv, D=D, PDL=self.pdl, num_warps=1, **_pdl_launch(self.pdl))
        return q

    @staticmethod
    def split_size(batch: int, heads: int, max_len: int) -> int:
        """Keys per split-K program: enough programs to fill the GPU, at most 64 splits a row."""
        cfg = attention_launch(batch)
        want_splits = max(1, -(-1024 // (batch * heads)))
        split = _next_pow2(-(-max_len // want_splits))
        return max(cfg["block_n"], min(split, cfg["max_split"]), _next_pow2(-(-max_len // 64)))

    def decode_attention(self, q, k_cache, v_cache, n_keys, scratch=None):
        if not self.use_triton:
            return decode_attention_ref(q, k_cache, v_cache, n_keys)
        B, H, D = q.shape
        L = k_cache.shape[2]
        split = self.split_size(B, H, L)
        n_split = -(-L // split)
        if scratch is None:
            scratch = self.attention_scratch(B, H, D, L, q.device)
        m, lsum, acc = scratch[:3]
        launch = attention_launch(B)
        _decode_attn_split_kernel[(B, H, n_split)](
            q, k_cache, v_cache, n_keys, m, lsum, acc, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), D ** -0.5 * 1.4426950408889634, n_split,
            H=H, GROUP=H // k_cache.shape[1], D=D, SPLIT=split, BLOCK_N=launch["block_n"],
            PDL=self.pdl, num_warps=launch["num_warps"], **_pdl_launch(self.pdl))
        out = torch.empty(B, H * D, device=q.device, dtype=q.dtype)
        _decode_attn_merge_kernel[(B * H,)](m, lsum, acc, out, out.stride(0), n_split,
                                            H=H, D=D, NSPLIT_P2=_next_pow2(n_split), PDL=self.pdl, num_warps=4,
                                            **_pdl_launch(self.pdl))
        return out

    def rope_attention(self, qkv, cos, sin, pos, n_keys, k_cache, v_cache, n_head, scratch=None, fuse=False):
        """rope_norm_store at ``pos`` then decode_attention over ``n_keys`` (= pos + 1, both made
        once per step by the caller), [B, H*D]. ``fuse``
        (Triton): RoPE, cache write, split-K attention and the merge in one launch, which pays
        for a single row (it recomputes each query per split and serialises the merge behind
        the last split: on an H200 the separate launches were faster at batch 4 and 128)."""
        if not (self.use_triton and fuse):
            q = self.rope_norm_store(qkv, cos, sin, pos, k_cache, v_cache, n_head)
            return self.decode_attention(q, k_cache, v_cache, n_keys, scratch)
        B = qkv.shape[0]
        n_kv, L, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        split = self.split_size(B, n_head, L)
        n_split = -(-L // split)
        if scratch is None:
            scratch = self.attention_scratch(B, n_head, D, L, qkv.device)
        m, lsum, acc, count = scratch
        out = torch.empty(B, n_head * D, device=qkv.device, dtype=qkv.dtype)
        launch = attention_launch(B)
        _rope_attn_split_kernel[(B, n_head, n_split)](
            qkv, cos, sin, n_keys, k_cache, v_cache, m, lsum, acc, count, out, qkv.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), D ** -0.5 * 1.4426950408889634,
            _norm_eps(qkv.dtype), n_split, H=n_head, HKV=n_kv, D=D, SPLIT=split,
            BLOCK_N=launch["block_n"], NSPLIT_P2=_next_pow2(n_split), PDL=self.pdl,
            num_warps=launch["num_warps"], **_pdl_launch(self.pdl))
        return out

    def attention_scratch(self, B: int, H: int, D: int, L: int, device) -> tuple[torch.Tensor, ...]:
        """Split-K partials (max, sum, weighted values) and, for the fused kernel, the per-(row,
        head) counters that pick the split which merges (zero between launches)."""
        n_split = -(-L // self.split_size(B, H, L))
        return (torch.empty(B * H * n_split, device=device, dtype=torch.float32),
                torch.empty(B * H * n_split, device=device, dtype=torch.float32),
                torch.empty(B * H * n_split * D, device=device, dtype=torch.float32),
                torch.zeros(B * H, device=device, dtype=torch.int32))

    def step_inputs(self, tokens, active, lengths, wte, pos, n_keys, max_len):
        """See :func:`step_inputs_ref`."""
        if not self.use_triton:
            return step_inputs_ref(tokens, active, lengths, wte, pos, n_keys, max_len)
        B, C = tokens.shape[0], wte.shape[1]
        x = torch.empty(B, C, device=wte.device, dtype=wte.dtype)
        _step_inputs_kernel[(B,)](tokens, active, lengths, wte, x, pos, n_keys, wte.stride(0), x.stride(0),
                                  _norm_eps(wte.dtype), max_len, C=C, BLOCK=_next_pow2(C), PDL=self.pdl,
                                  num_warps=4, **_pdl_launch(self.pdl))
        return x

    GREEDY_CHUNK = 2048  # logits per argmax program: 32 programs a row at a 65k vocabulary

    def greedy_scratch(self, B: int, V: int, device) -> tuple[torch.Tensor, ...]:
        """Per-chunk maxima and their indices, and the per-row tickets (zero between launches)."""
        n = B * -(-V // self.GREEDY_CHUNK)
        return (torch.empty(n, device=device, dtype=torch.float32), torch.empty(n, device=device, dtype=torch.int32),
                torch.zeros(B, device=device, dtype=torch.int32))

    def greedy_advance(self, logits, active, greedy, tokens, lengths, scratch=None):
        """See :func:`greedy_advance_ref`."""
        if not self.use_triton:
            return greedy_advance_ref(logits, active, greedy, tokens, lengths)
        B, V = logits.shape
        n_chunks = -(-V // self.GREEDY_CHUNK)
        pmax, pidx, count = scratch if scratch is not None else self.greedy_scratch(B, V, logits.device)
        _greedy_advance_kernel[(B, n_chunks)](logits, active, lengths, greedy, tokens, pmax, pidx, count, V,
                                              logits.stride(0), n_chunks, CHUNK=self.GREEDY_CHUNK,
                                              NCHUNK_P2=_next_pow2(n_chunks), PDL=self.pdl, num_warps=4,
                                              **_pdl_launch(self.pdl))

    def add_rms_norm(self, x, y):
        if not self.use_triton:
            return add_rms_norm_ref(x, y)
        B, C = x.shape
        h = torch.empty_like(x)
        _add_rms_norm_kernel[(B,)](x, y, h, x.stride(0), y.stride(0), h.stride(0), _norm_eps(x.dtype),
                                   C=C, BLOCK=_next_pow2(C), num_warps=4)
        return x, h

    def skinny_linear(self, x, w, norm_input=False, epilogue="none", out=None, cap=0.0, launch=None, pdl=None):
        """See :func:`skinny_linear_ref`; on Triton one fused kernel. ``launch`` = (BLOCK_N,
        num_warps) overrides :func:`skinny_launch` (benchmark sweeps)."""
        if not self.use_triton:
            return skinny_linear_ref(x, w, norm_input, epilogue, out, cap)
        B, K = x.shape
        N = w.shape[0]
        if epilogue in ("residual", "softcap"):
            y = out
        else:
            y = torch.empty(B, N, device=x.device, dtype=x.dtype)
        block_n, warps = launch or skinny_launch(B, N, K, _sm_count(x.device))
        pdl = self.pdl if pdl is None else pdl
        _skinny_linear_kernel[(triton.cdiv(N, block_n),)](
            x, w, y, x.stride(0), w.stride(0), y.stride(0), N, _norm_eps(x.dtype), float(cap),
            B=B, K=K, KP=_next_pow2(K), NORM=norm_input, EPILOGUE=EPILOGUES.index(epilogue),
            BLOCK_N=block_n, PDL=pdl, num_warps=warps, **_pdl_launch(pdl))
        return y

    def relu_square(self, x):
        if not self.use_triton:
            return relu_square_ref(x)
        n = x.numel()
        _relu_square_kernel[(triton.cdiv(n, 1024),)](x, n, BLOCK=1024, num_warps=4)
        return x


class GraphedDecoder:
    """One decode step for every row of a :class:`KVCache`: the serving hot loop.

    Inputs live in static buffers: ``tokens`` [B] (each row's last token) and ``active`` [B]
    (rows that hold a request). :meth:`step` embeds the tokens, runs all layers at each active
    row's own position (``cache.lengths``; idle rows, and rows already at the cache's end, compute a
    throwaway token at position 0),
    advances the active rows' lengths, and leaves softcapped fp32 ``logits`` [B, V] and their
    ``greedy`` argmax [B] in static buffers, which it also copies into ``tokens`` for the next
    step. Nothing in it synchronises with the host. On CUDA it is captured as a CUDA graph (at
    construction, so every row must be idle then; with ``ngram``, one with the blocker and one
    without) and replayed; with ``use_triton`` the
    elementwise work runs as fused Triton kernels, else as the torch references, which is how
    the CPU runs it. ``skinny`` (default: at most ``DECODE_GEMV["max_batch"]`` rows) multiplies
    by the weights through the fused small-batch GEMV instead of cuBLAS.

    ``ngram`` = (n, window): the step also applies the no-repeat n-gram blocker
    (:func:`model.ngram.block_ngrams`) before its argmax, to the rows marked in ``ngram_rows``
    [B], each with its own ``history`` [B, window] of generated tokens (right-aligned, -1 empty;
    the step shifts its token in) and ``ngram_whitelist`` [B, V] of tokens never banned. The
    engine fills those when a request joins; the blocker then costs the host nothing per step.
    """

    def __init__(self, gpt: "GPT", cache: KVCache, use_graph: bool | None = None,
                 use_triton: bool | None = None, skinny: bool | None = None,
                 ngram: tuple[int, int] | None = None) -> None:
        device = cache.k.device
        cuda = device.type == "cuda"
        self.gpt = gpt
        self.cache = cache
        self.kernels = DecodeKernels(cuda and triton is not None if use_triton is None else use_triton)
        self.use_graph = cuda if use_graph is None else use_graph
        cfg = gpt.config
        B, dtype = cache.batch_size, cache.k.dtype
        self.skinny = B <= DECODE_GEMV["max_batch"] if skinny is None else skinny
        weight = lambda w: w.detach().to(dtype)  # noqa: E731
        self.layers = []
        for block in gpt.transformer.h:
            a, m = block.attn, block.mlp
            qkv = torch.cat([weight(a.c_q.weight), weight(a.c_k.weight), weight(a.c_v.weight)])
            self.layers.append((qkv, weight(a.c_proj.weight), weight(m.c_fc.weight), weight(m.c_proj.weight)))
        self.wte = weight(gpt.transformer.wte.weight)
        self.lm_head = weight(gpt.lm_head.weight)
        self.cos, self.sin = gpt.cos.float(), gpt.sin.float()
        self.n_head = cfg.n_head
        self.tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.active = torch.zeros(B, dtype=torch.bool, device=device)
        self.lengths = cache.lengths
        self.scratch = (self.kernels.attention_scratch(B, cfg.n_head, cfg.head_dim, cache.max_len, device)
                        if self.kernels.use_triton else None)
        self.logits = torch.zeros(B, cfg.vocab_size, dtype=torch.float32, device=device)
        self.greedy = torch.zeros(B, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, dtype=torch.long, device=device)  # this step's positions and key counts
        self.n_keys = torch.zeros(B, dtype=torch.long, device=device)
        self.greedy_scratch = (self.kernels.greedy_scratch(B, cfg.vocab_size, device)
                               if self.kernels.use_triton else None)
        self.ngram = ngram if ngram is not None and ngram[0] > 0 else None
        if self.ngram is not None:
            n, window = self.ngram
            if window < n:
                raise ValueError(f"n-gram window {window} is shorter than n = {n}")
            self.ngram_rows = torch.zeros(B, dtype=torch.bool, device=device)
            self.history = torch.full((B, window), -1, dtype=torch.long, device=device)
            self.ngram_whitelist = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        # set before step(): some row uses the blocker. Steps without one replay a graph without
        # its kernels (~10 small ones: 5% of a batch-1 step)
        self.ngram_on = False
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}  # by ngram_on
        if self.use_graph:
            self._capture_with_fallbacks()

    def weight_bytes(self) -> int:
        """Bytes of weights one step reads (every matrix once; the embedding rows are negligible)."""
        mats = [w for layer in self.layers for w in layer] + [self.lm_head]
        return sum(w.numel() * w.element_size() for w in mats)

    def _forward(self, ngram: bool) -> None:
        k = self.kernels
        cache, n_head = self.cache, self.n_head
        pos, n_keys = self.pos, self.n_keys  # written by step_inputs (idle rows: position 0)
        x = k.step_inputs(self.tokens, self.active, self.lengths, self.wte, pos, n_keys, cache.max_len)
        cap = self.gpt.config.logit_softcap
        if self.skinny:  # one row: norms, activations, residual adds and the attention merge fused in
            for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(self.layers):
                kc, vc = cache.k[i], cache.v[i]
                qkv = k.skinny_linear(x, w_qkv, norm_input=True)
                y = k.rope_attention(qkv, self.cos, self.sin, pos, n_keys, kc, vc, n_head, self.scratch, fuse=True)
                k.skinny_linear(y, w_o, epilogue="residual", out=x)
                m = k.skinny_linear(x, w_fc, norm_input=True, epilogue="relu2")
                k.skinny_linear(m, w_proj, epilogue="residual", out=x)
            k.skinny_linear(x, self.lm_head, norm_input=True, epilogue="softcap", out=self.logits, cap=cap)
        else:
            h = rms_norm(x)
            for i, (w_qkv, w_o, w_fc, w_proj) in enumerate(self.layers):
                kc, vc = cache.k[i], cache.v[i]
                y = k.rope_attention(F.linear(h, w_qkv), self.cos, self.sin, pos, n_keys, kc, vc, n_head,
                                     self.scratch)
                x, h = k.add_rms_norm(x, F.linear(y, w_o))
                x, h = k.add_rms_norm(x, F.linear(k.relu_square(F.linear(h, w_fc)), w_proj))
            self.logits.copy_(cap * torch.tanh(F.linear(h, self.lm_head).float() / cap))
        if ngram:
            block_ngrams(self.logits, self.history, self.ngram[0], self.ngram_whitelist, self.ngram_rows, inplace=True)
        k.greedy_advance(self.logits, self.active, self.greedy, self.tokens, self.lengths, self.greedy_scratch)
        if ngram:
            push_tokens(self.history, self.tokens, self.ngram_rows & self.active)

    def _capture_with_fallbacks(self) -> None:
        """Capture with the fastest kernels that work here: Triton with programmatic dependent
        launch, Triton without it, then the torch ops. The variant with the n-gram blocker is
        captured after, on its own, and left out if it fails (the engine then blocks on the host):
        a build problem must not stop decoding, and the blocker's must not cost the kernels."""
        while True:
            try:
                self._capture(ngram=False)
                break
            except Exception as exc:
                self.graphs = {}
                if not self.kernels.use_triton:
                    raise
                if self.kernels.pdl:
                    warnings.warn(f"decode kernels with programmatic dependent launch failed "
                                  f"({type(exc).__name__}: {exc}); capturing without it")
                    self.kernels = DecodeKernels(True, pdl=False)
                else:
                    warnings.warn(f"Triton decode kernels failed ({type(exc).__name__}: {exc}); using torch ops")
                    self.kernels, self.scratch, self.greedy_scratch = DecodeKernels(False), None, None
        if self.ngram is None:
            return
        try:
            self._capture(ngram=True)
        except Exception as exc:  # _capture stores a graph only once it is captured
            warnings.warn(f"decode graph with the n-gram blocker failed ({type(exc).__name__}: {exc}); "
                          "the engine blocks on the host instead")
            self.ngram = None

    @torch.no_grad()
    def _capture(self, ngram: bool) -> None:
        """One graph: with or without the blocker (the second shares the first's memory pool, as
        only one of them runs at a time)."""
        if self.active.any():
            raise RuntimeError("GraphedDecoder captures with every row idle")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                self._forward(ngram)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = self.graphs[False].pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool):
            self._forward(ngram)
        self.graphs[ngram] = graph
        self.tokens.zero_()

    @torch.inference_mode()
    def step(self) -> None:
        """Advance every active row by one token (results in ``logits`` and ``greedy``)."""
        if self.cache.lengths is not self.lengths:  # someone rebound it: keep the captured tensor
            self.lengths.copy_(self.cache.lengths)
            self.cache.lengths = self.lengths
        ngram = self.ngram_on and self.ngram is not None
        if self.graphs:
            self.graphs[ngram].replay()
        else:
            self._forward(ngram)
