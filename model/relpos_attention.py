"""Flash attention with SAM's decomposed relative positions added inside the kernel (Triton).

Why: SAM's global blocks add Rh[q, kh] + Rw[q, kw] to every score. The fold in ``model.sam``
runs that as one flash call on dot products widened from d to d + h + w (3x at the 64x64 grid of a
1024 px view) and was the largest kernel of a compiled training step (bench/RESULTS.md, session
20); FlexAttention, which reads the tables per score, was 3-7x slower still. Here the keys are
walked one grid row at a time: within row kh the Rh term is one value per query and the Rw term is
the same [queries, w] tile for every row, loaded once. So QK^T and PV stay at head dim d, and the
gradients of the two tables are plain reductions of dS: dRh[q, kh] sums row kh's tile, dRw[q, :]
sums the tiles over the rows. Measured on an H100 (bench/RESULTS.md, session 20): 1.38x faster than
the fold for the global blocks at 1024 px, a tie at 640 px; opt-in for now (``model.sam``).

``relpos_attention(q, k, v, bias_h, bias_w)``: q, k, v [B, H, N, D] with N = h * w (keys in row
order), bias_h [B, H, N, h], bias_w [B, H, N, w] (the per-query tables of ``model.sam``); softmax
scale D^-0.5 on QK^T only, as SAM does. A ``torch.library`` op with its own backward, so
``torch.compile`` (``compile_vision``) keeps it whole. Without a GPU the kernels run in Triton's
interpreter (tests).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; the CPU wheels lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK_M = 64  # queries per program (and per step of the dK/dV loop)
NUM_WARPS = 4
MAX_ROW = 128  # widest grid row (keys per step); SAM's global grid is 64 at 1024 px, 80 at 1280


def supported(q: torch.Tensor, w: int) -> bool:
    """Whether this kernel runs these inputs (else the caller keeps its own path)."""
    d = q.shape[-1]
    return triton is not None and q.is_cuda and d in (16, 32, 64, 128) and 1 <= w <= MAX_ROW


if triton is not None:

    @triton.jit
    def _tile(ptr, index, ok, dims, stride):
        """Rows ``index`` of a [N, D] matrix; masked rows read as zeros."""
        return tl.load(ptr + index[:, None] * stride + dims[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _rw_tile(ptr, rows, cols, row_ok, key_ok, stride):
        """The Rw table of a block of queries, [queries, keys of a row], in fp32."""
        return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=row_ok[:, None] & key_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _scores(q, k, bh_ptr, bw, row_ids, kh, scale, row_ok, key_ok, stride_bh_n):
        """Scores of one key row, already in log2 units: (scale*q.k + Rh[q, kh] + Rw[q, kw]) * log2(e)."""
        s = tl.dot(q, tl.trans(k)) * scale
        bh = tl.load(bh_ptr + row_ids * stride_bh_n + kh, mask=row_ok, other=0.0).to(tl.float32)
        s = (s + bw + bh[:, None]) * 1.4426950408889634
        return tl.where(key_ok[None, :], s, float("-inf"))

    @triton.jit
    def _fwd_kernel(Q, K, V, BH, BW, O, LSE, N, H_ROWS, W, scale,
                    s_qb, s_qn, s_bhb, s_bhn, s_bwb, s_bwn,
                    D: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr):
        pid_m, bh_id = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, ROW)
        dims = tl.arange(0, D)
        row_ok = rows < N
        key_ok = cols < W
        q = _tile(Q + bh_id * s_qb, rows, row_ok, dims, s_qn)
        bw = _rw_tile(BW + bh_id * s_bwb, rows, cols, row_ok, key_ok, s_bwn)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, D], tl.float32)
        for kh in range(0, H_ROWS):
            keys = kh * W + cols
            k = _tile(K + bh_id * s_qb, keys, key_ok, dims, s_qn)
            v = _tile(V + bh_id * s_qb, keys, key_ok, dims, s_qn)
            s = _scores(q, k, BH + bh_id * s_bhb, bw, rows, kh, scale, row_ok, key_ok, s_bhn)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + bh_id * s_qb + rows[:, None] * s_qn + dims[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(LSE + bh_id * N + rows, m_i + tl.log2(l_i), mask=row_ok)  # log2 units

    @triton.jit
    def _bwd_dkdv_kernel(Q, K, V, BH, BW, DO, LSE, DELTA, DK, DV, N, W, scale,
                         s_qb, s_qn, s_bhb, s_bhn, s_bwb, s_bwn,
                         D: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr):
        """One key row (kh) per program: its dK and dV, over every block of queries."""
        kh, bh_id = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, ROW)
        dims = tl.arange(0, D)
        key_ok = cols < W
        keys = kh * W + cols
        k = _tile(K + bh_id * s_qb, keys, key_ok, dims, s_qn)
        v = _tile(V + bh_id * s_qb, keys, key_ok, dims, s_qn)
        dk = tl.zeros([ROW, D], tl.float32)
        dv = tl.zeros([ROW, D], tl.float32)
        for start in range(0, N, BLOCK):
            rows = start + tl.arange(0, BLOCK)
            row_ok = rows < N
            q = _tile(Q + bh_id * s_qb, rows, row_ok, dims, s_qn)
            do = _tile(DO + bh_id * s_qb, rows, row_ok, dims, s_qn)
            bw = _rw_tile(BW + bh_id * s_bwb, rows, cols, row_ok, key_ok, s_bwn)
            lse = tl.load(LSE + bh_id * N + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + bh_id * N + rows, mask=row_ok, other=0.0)
            s = _scores(q, k, BH + bh_id * s_bhb, bw, rows, kh, scale, row_ok, key_ok, s_bhn)
            p = tl.where(row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        tl.store(DK + bh_id * s_qb + keys[:, None] * s_qn + dims[None, :], (dk * scale).to(DK.dtype.element_ty),
                 mask=key_ok[:, None])
        tl.store(DV + bh_id * s_qb + keys[:, None] * s_qn + dims[None, :], dv.to(DV.dtype.element_ty),
                 mask=key_ok[:, None])

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, BH, BW, DO, LSE, DELTA, DQ, DBH, DBW, N, H_ROWS, W, scale,
                       s_qb, s_qn, s_bhb, s_bhn, s_bwb, s_bwn,
                       D: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr):
        """One block of queries per program: its dQ and both tables' gradients, over every key row."""
        pid_m, bh_id = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, ROW)
        dims = tl.arange(0, D)
        row_ok = rows < N
        key_ok = cols < W
        q = _tile(Q + bh_id * s_qb, rows, row_ok, dims, s_qn)
        do = _tile(DO + bh_id * s_qb, rows, row_ok, dims, s_qn)
        bw = _rw_tile(BW + bh_id * s_bwb, rows, cols, row_ok, key_ok, s_bwn)
        lse = tl.load(LSE + bh_id * N + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh_id * N + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK, D], tl.float32)
        dbw = tl.zeros([BLOCK, ROW], tl.float32)
        for kh in range(0, H_ROWS):
            keys = kh * W + cols
            k = _tile(K + bh_id * s_qb, keys, key_ok, dims, s_qn)
            v = _tile(V + bh_id * s_qb, keys, key_ok, dims, s_qn)
            s = _scores(q, k, BH + bh_id * s_bhb, bw, rows, kh, scale, row_ok, key_ok, s_bhn)
            p = tl.exp2(s - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
            dbw += ds
            tl.store(DBH + bh_id * s_bhb + rows * s_bhn + kh, tl.sum(ds, 1), mask=row_ok)
        tl.store(DQ + bh_id * s_qb + rows[:, None] * s_qn + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(DBW + bh_id * s_bwb + rows[:, None] * s_bwn + cols[None, :], dbw,
                 mask=row_ok[:, None] & key_ok[None, :])


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, X] -> contiguous [B*H, N, X] (the kernels' layout)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _launch(d: int, w: int) -> dict:
    """Tile sizes and launch settings, the same for the forward and both backward kernels."""
    return dict(D=d, BLOCK=BLOCK_M, ROW=max(16, triton.next_power_of_2(w)), num_warps=NUM_WARPS, num_stages=2)


@torch.library.custom_op("nano_ocr::relpos_attention_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
         bias_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, bias_h, bias_w = (_flat(x) for x in (q, k, v, bias_h, bias_w))
    bh, n, d = q.shape
    w = bias_w.shape[-1]
    out = torch.empty_like(q)
    lse = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    _fwd_kernel[(triton.cdiv(n, BLOCK_M), bh)](
        q, k, v, bias_h, bias_w, out, lse, n, bias_h.shape[-1], w, d ** -0.5,
        q.stride(0), q.stride(1), bias_h.stride(0), bias_h.stride(1), bias_w.stride(0), bias_w.stride(1),
        **_launch(d, w))
    return out, lse


@_fwd.register_fake
def _fwd_fake(q, k, v, bias_h, bias_w):
    b_h = q.shape[0] * q.shape[1]
    return q.new_empty(b_h, q.shape[2], q.shape[3]), q.new_empty(b_h, q.shape[2], dtype=torch.float32)


@torch.library.custom_op("nano_ocr::relpos_attention_bwd", mutates_args=())
def _bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
         bias_w: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, bias_h, bias_w, grad_out = (_flat(x) for x in (q, k, v, bias_h, bias_w, grad_out))
    bh, n, d = q.shape
    w, rows = bias_w.shape[-1], bias_h.shape[-1]
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # rowsum(dO * O), as in flash attention
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dbias_h = torch.empty(bias_h.shape, device=q.device, dtype=torch.float32)
    dbias_w = torch.empty(bias_w.shape, device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), bias_h.stride(0), bias_h.stride(1), bias_w.stride(0), bias_w.stride(1))
    meta = _launch(d, w)
    _bwd_dkdv_kernel[(rows, bh)](q, k, v, bias_h, bias_w, grad_out, lse, delta, dk, dv, n, w, d ** -0.5,
                                 *strides, **meta)
    _bwd_dq_kernel[(triton.cdiv(n, BLOCK_M), bh)](q, k, v, bias_h, bias_w, grad_out, lse, delta, dq, dbias_h,
                                                  dbias_w, n, rows, w, d ** -0.5, *strides, **meta)
    return dq, dk, dv, dbias_h, dbias_w


@_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, bias_h, bias_w, out, lse):
    flat = (lambda x: x.new_empty(x.shape[0] * x.shape[1], x.shape[2], x.shape[3]))  # noqa: E731
    return (flat(q), flat(k), flat(v), flat(bias_h).float(), flat(bias_w).float())


def _setup(ctx, inputs, output) -> None:
    q, k, v, bias_h, bias_w = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias_h, bias_w, out, lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, bias_h, bias_w, out, lse = ctx.saved_tensors
    dq, dk, dv, dbh, dbw = _bwd(grad_out, q, k, v, bias_h, bias_w, out, lse)
    return (dq.view(q.shape), dk.view(k.shape), dv.view(v.shape), dbh.view(bias_h.shape).to(bias_h.dtype),
            dbw.view(bias_w.shape).to(bias_w.dtype))


_fwd.register_autograd(_backward, setup_context=_setup)


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor,
                     bias_w: torch.Tensor) -> torch.Tensor:
    """softmax(D^-0.5 q.k + bias_h[q, k // w] + bias_w[q, k % w]) v, for q, k, v [B, H, N, D]."""
    if triton is None:
        raise RuntimeError("relpos_attention needs Triton (CUDA builds of torch ship it)")
    b, h, n, d = q.shape
    if bias_h.shape[-1] * bias_w.shape[-1] != n:
        raise ValueError(f"relpos_attention: {n} keys are not the {bias_h.shape[-1]} x {bias_w.shape[-1]} grid "
                         "of the tables")
    out, _ = _fwd(q, k, v, bias_h, bias_w)
    return out.view(b, h, n, d)
