"""The Triton decode kernels against their torch references.

Runs where Triton runs: on a CUDA GPU, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1 pytest tests/test_decode_kernels.py``, with numpy < 2.3 for the
interpreter); the full-preset kernels are also compiled for Hopper (sm_90) without a GPU. CI's CPU
wheel of torch ships no Triton, so there these are skipped; the references themselves are tested
against the eager model in tests/test_gpt.py.
"""

import os

import pytest
import torch

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


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter compiles nothing")
@pytest.mark.parametrize("pdl", [True, False])
def test_full_preset_decode_kernels_compile_for_hopper(pdl):
    """Triton's whole pipeline down to ptxas, for sm_90 and the full preset's shapes (no GPU
    needed): a kernel that does not build would make the decoder fall back to slow torch ops."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    ptr = lambda t: "*" + t  # noqa: E731

    def build(fn, signature, constexprs, num_warps):
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                       options={"num_warps": num_warps})

    attn = {"QKV": ptr("bf16"), "COS": ptr("fp32"), "SIN": ptr("fp32"), "NKEYS": ptr("i64"), "KC": ptr("bf16"),
            "VC": ptr("bf16"), "MOUT": ptr("fp32"), "LOUT": ptr("fp32"), "AOUT": ptr("fp32"), "COUNT": ptr("i32"),
            "OUT": ptr("bf16"), "s_qkv": "i32", "s_c_b": "i32", "s_c_h": "i32", "s_c_t": "i32", "s_o_b": "i32",
            "scale_log2": "fp32", "eps": "fp32", "n_split": "i32"}
    for kv_heads, split in ((10, 64), (5, 128)):  # MHA with one tile per split; GQA with two
        build(gpt_module._rope_attn_split_kernel, attn, {"H": 10, "HKV": kv_heads, "D": 128, "SPLIT": split,
                                                         "BLOCK_N": 64, "NSPLIT_P2": 32, "PDL": pdl}, 4)
    rope = {"QKV": ptr("bf16"), "COS": ptr("fp32"), "SIN": ptr("fp32"), "POS": ptr("i64"), "QOUT": ptr("bf16"),
            "KC": ptr("bf16"), "VC": ptr("bf16"), "s_qkv": "i32", "s_qo_b": "i32", "s_qo_h": "i32", "s_c_b": "i32",
            "s_c_h": "i32", "s_c_t": "i32", "eps": "fp32"}
    build(gpt_module._rope_norm_store_kernel, rope, {"H": 10, "HKV": 10, "D": 128, "PDL": pdl}, 1)
    merge = {"MOUT": ptr("fp32"), "LOUT": ptr("fp32"), "AOUT": ptr("fp32"), "OUT": ptr("bf16"), "s_o_b": "i32",
             "n_split": "i32"}
    build(gpt_module._decode_attn_merge_kernel, merge, {"H": 10, "D": 128, "NSPLIT_P2": 32, "PDL": pdl}, 4)
    for (n, k), (block_n, warps) in gpt_module.SKINNY_TUNED.items():
        for norm, epilogue in ((True, 0), (False, 2), (True, 1), (True, 3)):
            y = "fp32" if epilogue == 3 else "bf16"
            gemv = {"X": ptr("bf16"), "W": ptr("bf16"), "Y": ptr(y), "s_x": "i32", "s_w": "i32", "s_y": "i32",
                    "N": "i32", "eps": "fp32", "cap": "fp32"}
            build(gpt_module._skinny_linear_kernel, gemv, {"B": 1, "K": k, "KP": triton.next_power_of_2(k),
                                                            "NORM": norm, "EPILOGUE": epilogue, "BLOCK_N": block_n,
                                                            "PDL": pdl}, warps)
