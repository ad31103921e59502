"""The Triton decode kernels against their torch references.

Runs where Triton runs: on a CUDA GPU, or on the CPU under Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` where there is no GPU; ``make test`` installs Triton next to a CPU wheel
of torch); the full-preset kernels are also compiled for Hopper (sm_90) without a GPU, in a process
of their own when the interpreter is on. The references themselves are tested against the eager
model in tests/test_gpt.py.
"""

import os

import pytest
import torch

from hopper_build import build_for_hopper, rerun_without_interpreter

import model.gpt as gpt_module
from model.gpt import DecodeKernels

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(gpt_module.triton is None, reason="needs Triton")
runs_kernels = pytest.mark.skipif(gpt_module.triton is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = (torch.float32, torch.bfloat16) if CUDA else (torch.float32,)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tol(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 5e-2  # bf16: the references norm in bf16, the kernels in fp32


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 64, True, "none"), (64, 64, False, "residual"), (256, 64, True, "relu2"),
                                   (64, 256, False, "residual"), (300, 64, True, "softcap")])
def test_skinny_linear_matches_reference(shape, dtype):
    n, k, norm, epilogue = shape
    torch.manual_seed(0)
    fused, ref = DecodeKernels(True, pdl=False), DecodeKernels(False)
    for rows in (1, 3):
        x = torch.randn(rows, k, device=DEVICE, dtype=dtype)
        w = (torch.randn(n, k, device=DEVICE) * k ** -0.5).to(dtype)
        base = torch.randn(rows, n, device=DEVICE, dtype=torch.float32 if epilogue == "softcap" else dtype)
        got, want = base.clone(), base.clone()
        y = fused.skinny_linear(x, w, norm, epilogue, got, 3.0)
        assert _rel(y, ref.skinny_linear(x, w, norm, epilogue, want, 3.0)) < _tol(dtype)
        if epilogue in ("residual", "softcap"):
            assert y is got  # written in place


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, cache_len, rows, block_n",
                         [(4, 4, 80, 3, 64), (4, 2, 80, 3, 64), (2, 1, 2048, 1, 16)])
def test_rope_attention_fused_and_separate_match_reference(heads, kv_heads, cache_len, rows, block_n, dtype,
                                                            monkeypatch):
    """RoPE + cache write + split-K attention (+ the merge by the last split): MHA and GQA, rows of
    different lengths (one at position 0), several tiles per split, and the merge counters back at
    zero for the next call."""
    monkeypatch.setitem(gpt_module.DECODE_ATTENTION, "block_n", block_n)
    monkeypatch.setitem(gpt_module.DECODE_ATTENTION_ONE_ROW, "block_n", block_n)
    torch.manual_seed(1)
    D = 32
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * D, device=DEVICE, dtype=dtype)
    kc = torch.randn(rows, kv_heads, cache_len, D, device=DEVICE, dtype=dtype)
    vc = torch.randn(rows, kv_heads, cache_len, D, device=DEVICE, dtype=dtype)
    angles = torch.rand(cache_len, D // 2, device=DEVICE) * 6.28
    cos, sin = angles.cos(), angles.sin()
    n_keys = torch.tensor([1, 17, 70][:rows] if rows > 1 else [1500], device=DEVICE)
    ref = DecodeKernels(False)
    k_want, v_want = kc.clone(), vc.clone()
    want = ref.rope_attention(qkv, cos, sin, n_keys - 1, n_keys, k_want, v_want, heads)
    kernels = DecodeKernels(True, pdl=False)
    for fuse in (True, False):
        k_got, v_got = kc.clone(), vc.clone()
        scratch = kernels.attention_scratch(rows, heads, D, cache_len, DEVICE)
        for _ in range(2):
            got = kernels.rope_attention(qkv, cos, sin, n_keys - 1, n_keys, k_got, v_got, heads, scratch, fuse)
            assert _rel(got, want) < _tol(dtype)
        assert scratch[3].eq(0).all()
        assert _rel(k_got, k_want) < _tol(dtype) and _rel(v_got, v_want) < _tol(dtype)


@runs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_inputs_match_reference(dtype):
    """A step's start: positions (idle rows, and an active row already at the cache's end, at 0),
    key counts and the normed token embeddings."""
    torch.manual_seed(2)
    wte = torch.randn(50, 96, device=DEVICE, dtype=dtype)  # a width that is not a power of two
    tokens = torch.tensor([3, 49, 0, 7], device=DEVICE)
    active = torch.tensor([True, False, True, True], device=DEVICE)
    lengths = torch.tensor([5, 9, 0, 16], device=DEVICE)
    got = [torch.full((4,), -1, device=DEVICE, dtype=torch.long) for _ in range(2)]
    want = [torch.full((4,), -1, device=DEVICE, dtype=torch.long) for _ in range(2)]
    x = DecodeKernels(True, pdl=False).step_inputs(tokens, active, lengths, wte, *got, 16)
    assert _rel(x, DecodeKernels(False).step_inputs(tokens, active, lengths, wte, *want, 16)) < _tol(dtype)
    assert got[0].tolist() == want[0].tolist() == [5, 0, 0, 0]
    assert got[1].tolist() == want[1].tolist() == [6, 1, 1, 1]


@runs_kernels
def test_greedy_advance_matches_argmax():
    """A step's end: each row's first maximum over several chunks (a tie across chunks, a NaN as
    torch.argmax counts it), copied to the next step's tokens, and only active rows advanced; the
    tickets are back at zero, so a second call (a graph replay) gives the same."""
    torch.manual_seed(3)
    V = 5000  # three chunks of 2048, the last one partial
    logits = torch.randn(4, V, device=DEVICE)
    logits[0, [100, 4100]] = 9.0  # tie across chunks: the first wins
    logits[1, 4999] = 9.0  # the last logit
    logits[2, 3000] = float("nan")
    active = torch.tensor([True, True, False, True], device=DEVICE)
    kernels = DecodeKernels(True, pdl=False)
    scratch = kernels.greedy_scratch(4, V, DEVICE)
    want = torch.argmax(logits, dim=-1)
    assert want[:3].tolist() == [100, 4999, 3000]
    for call in range(2):
        greedy = torch.full((4,), -1, device=DEVICE, dtype=torch.long)
        tokens = torch.full((4,), -1, device=DEVICE, dtype=torch.long)
        lengths = torch.tensor([7, 0, 3, 12], device=DEVICE)
        kernels.greedy_advance(logits, active, greedy, tokens, lengths, scratch)
        assert greedy.tolist() == tokens.tolist() == want.tolist(), call
        assert lengths.tolist() == [8, 1, 3, 13]
        assert scratch[2].eq(0).all()


@needs_triton
@pytest.mark.parametrize("pdl", [True, False])
def test_full_preset_decode_kernels_compile_for_hopper(pdl):
    """Triton's whole pipeline down to ptxas, for sm_90 and the full preset's shapes (no GPU
    needed): a kernel that does not build would make the decoder fall back to slow torch ops."""
    if rerun_without_interpreter(f"{__file__}::test_full_preset_decode_kernels_compile_for_hopper[{pdl}]"):
        return
    import triton

    ptr = lambda t: "*" + t  # noqa: E731
    build = build_for_hopper

    attn = {"QKV": ptr("bf16"), "COS": ptr("fp32"), "SIN": ptr("fp32"), "NKEYS": ptr("i64"), "KC": ptr("bf16"),
            "VC": ptr("bf16"), "MOUT": ptr("fp32"), "LOUT": ptr("fp32"), "AOUT": ptr("fp32"), "COUNT": ptr("i32"),
            "OUT": ptr("bf16"), "s_qkv": "i32", "s_c_b": "i32", "s_c_h": "i32", "s_c_t": "i32", "s_o_b": "i32",
            "scale_log2": "fp32", "eps": "fp32", "n_split": "i32"}
    one_row = gpt_module.DECODE_ATTENTION_ONE_ROW
    # MHA with one tile per split; GQA with two; the one-row launch
    for kv_heads, split, block_n, warps in ((10, 64, 64, 4), (5, 128, 64, 4),
                                            (10, one_row["block_n"], one_row["block_n"], one_row["num_warps"])):
        build(gpt_module._rope_attn_split_kernel, attn, {"H": 10, "HKV": kv_heads, "D": 128, "SPLIT": split,
                                                         "BLOCK_N": block_n, "NSPLIT_P2": 64, "PDL": pdl}, warps)
    rope = {"QKV": ptr("bf16"), "COS": ptr("fp32"), "SIN": ptr("fp32"), "POS": ptr("i64"), "QOUT": ptr("bf16"),
            "KC": ptr("bf16"), "VC": ptr("bf16"), "s_qkv": "i32", "s_qo_b": "i32", "s_qo_h": "i32", "s_c_b": "i32",
            "s_c_h": "i32", "s_c_t": "i32", "eps": "fp32"}
    build(gpt_module._rope_norm_store_kernel, rope, {"H": 10, "HKV": 10, "D": 128, "PDL": pdl}, 1)
    merge = {"MOUT": ptr("fp32"), "LOUT": ptr("fp32"), "AOUT": ptr("fp32"), "OUT": ptr("bf16"), "s_o_b": "i32",
             "n_split": "i32"}
    build(gpt_module._decode_attn_merge_kernel, merge, {"H": 10, "D": 128, "NSPLIT_P2": 32, "PDL": pdl}, 4)
    step = {"TOKENS": ptr("i64"), "ACTIVE": ptr("i1"), "LENGTHS": ptr("i64"), "WTE": ptr("bf16"), "X": ptr("bf16"),
            "POS": ptr("i64"), "NKEYS": ptr("i64"), "s_w": "i32", "s_x": "i32", "eps": "fp32", "max_len": "i32"}
    build(gpt_module._step_inputs_kernel, step, {"C": 1280, "BLOCK": 2048, "PDL": pdl}, 4)
    greedy = {"LOGITS": ptr("fp32"), "ACTIVE": ptr("i1"), "LENGTHS": ptr("i64"), "GREEDY": ptr("i64"),
              "TOKENS": ptr("i64"), "PMAX": ptr("fp32"), "PIDX": ptr("i32"), "COUNT": ptr("i32"), "V": "i32",
              "s_l": "i32", "n_chunks": "i32"}
    build(gpt_module._greedy_advance_kernel, greedy, {"CHUNK": DecodeKernels.GREEDY_CHUNK, "NCHUNK_P2": 32,
                                                      "PDL": pdl}, 4)
    for (n, k), (block_n, warps) in gpt_module.SKINNY_TUNED.items():
        for norm, epilogue in ((True, 0), (False, 2), (True, 1), (True, 3)):
            y = "fp32" if epilogue == 3 else "bf16"
            gemv = {"X": ptr("bf16"), "W": ptr("bf16"), "Y": ptr(y), "s_x": "i32", "s_w": "i32", "s_y": "i32",
                    "N": "i32", "eps": "fp32", "cap": "fp32"}
            build(gpt_module._skinny_linear_kernel, gemv, {"B": 1, "K": k, "KP": triton.next_power_of_2(k),
                                                            "NORM": norm, "EPILOGUE": epilogue, "BLOCK_N": block_n,
                                                            "PDL": pdl}, warps)
