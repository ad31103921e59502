"""The relative-position flash kernel (model/relpos_attention.py) against SAM's bias path.

Runs where Triton runs: on a CUDA GPU, or on the CPU under Triton's interpreter (tests/conftest.py
sets ``TRITON_INTERPRET=1`` where there is no GPU). The kernels are also compiled for Hopper (sm_90)
without a GPU, in a process of their own when the interpreter is on.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from hopper_build import build_for_hopper, rerun_without_interpreter

import model.relpos_attention as kernel
from model.sam import decomposed_rel_pos_bias, rel_pos_triton_attention

CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(kernel.triton is None, reason="needs Triton")
runs_kernels = pytest.mark.skipif(kernel.triton is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs Triton on a GPU, or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA else "cpu"


def _inputs(h: int, w: int, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(2, 2, h * w, d, generator=g) for _ in range(3)]
    tables = [torch.randn(2 * h - 1, d, generator=g) * 0.5, torch.randn(2 * w - 1, d, generator=g) * 0.5]
    return [x.to(DEVICE) for x in qkv + tables]


def _output_and_grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    q, k, v, rph, rpw = (x.clone().requires_grad_(True) for x in inputs)
    out = fn(q, k, v, rph, rpw)
    return [out, *torch.autograd.grad(out.square().sum(), [q, k, v, rph, rpw])]


def _bias_path(q, k, v, rph, rpw):
    size = (rph.shape[0] + 1) // 2, (rpw.shape[0] + 1) // 2
    return F.scaled_dot_product_attention(q, k, v, attn_mask=decomposed_rel_pos_bias(q, rph, rpw, size, size))


@runs_kernels
@pytest.mark.parametrize("grid", [(5, 6), (3, 20), (9, 12)])  # one query block; a 32-wide row; two query blocks
def test_kernel_matches_the_bias_path_with_gradients(grid):
    """Output and all five gradients (q, k, v and both position tables, through the tables'
    products in torch) as SAM's bias path gives them, in fp32; rows narrower than the key tile and
    query counts off the block size are masked."""
    h, w = grid
    inputs = _inputs(h, w)
    want = _output_and_grads(_bias_path, inputs)
    got = _output_and_grads(lambda q, k, v, rph, rpw: rel_pos_triton_attention(q, k, v, rph, rpw, (h, w)), inputs)
    for name, a, b in zip(["out", "q", "k", "v", "rel_pos_h", "rel_pos_w"], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@runs_kernels
def test_kernel_traces_under_torch_compile():
    """The op's fake implementations let torch.compile (compile_vision) trace it whole, with the
    view count dynamic, and the compiled function still matches eager."""
    h, w = 4, 5
    q, k, v, rph, rpw = _inputs(h, w)

    def attend(q, k, v, rph, rpw):
        return rel_pos_triton_attention(q, k, v, rph, rpw, (h, w))

    compiled = torch.compile(attend, backend="aot_eager", dynamic=True)
    for views in (2, 1):
        args = [x[:views] for x in (q, k, v)] + [rph, rpw]
        torch.testing.assert_close(compiled(*args), attend(*args), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_tables_of_another_grid():
    h, w = 3, 4
    q, k, v, rph, rpw = _inputs(h, w)
    bias_h = torch.zeros(2, 2, h * w, h + 1)
    with pytest.raises(ValueError, match="12 keys are not the 4 x 4 grid"):
        kernel.relpos_attention(q, k, v, bias_h, torch.zeros(2, 2, h * w, w))


def test_supported_only_on_cuda_and_kernel_shapes():
    q = torch.zeros(1, 1, 4, 64)
    assert not kernel.supported(q, 64)  # a CPU tensor: SAM keeps its bias path
    if CUDA and kernel.triton is not None:
        assert kernel.supported(q.cuda(), 64) and not kernel.supported(q.cuda(), kernel.MAX_ROW + 1)
        assert not kernel.supported(torch.zeros(1, 1, 4, 80, device="cuda"), 64)


@needs_triton
def test_kernels_compile_for_hopper():
    """Triton's whole pipeline down to ptxas, for sm_90 at SAM-B's global-block shapes (head dim 64,
    64 keys a row, bf16): a kernel that does not build would fail the first CUDA training step."""
    if rerun_without_interpreter(f"{__file__}::test_kernels_compile_for_hopper"):
        return

    def build(fn, pointers: dict[str, str], ints: list[str]):
        signature = {**{name: "*" + t for name, t in pointers.items()}, **{name: "i32" for name in ints},
                     "scale": "fp32", **{s: "i32" for s in ("s_qb", "s_qn", "s_bhb", "s_bhn", "s_bwb", "s_bwn")}}
        signature = {name: signature[name] for name in fn.arg_names if name in signature}  # the kernel's order
        build_for_hopper(fn, signature, {"D": 64, "BLOCK": kernel.BLOCK_M, "ROW": 64}, kernel.NUM_WARPS, num_stages=2)

    common = {"Q": "bf16", "K": "bf16", "V": "bf16", "BH": "bf16", "BW": "bf16"}
    build(kernel._fwd_kernel, {**common, "O": "bf16", "LSE": "fp32"}, ["N", "H_ROWS", "W"])
    grads = {**common, "DO": "bf16", "LSE": "fp32", "DELTA": "fp32"}
    build(kernel._bwd_dkdv_kernel, {**grads, "DK": "bf16", "DV": "bf16"}, ["N", "W"])
    build(kernel._bwd_dq_kernel, {**grads, "DQ": "bf16", "DBH": "fp32", "DBW": "fp32"}, ["N", "H_ROWS", "W"])
