"""SAM and CLIP encoders on the tiny preset: shapes per resolution mode, position resizing,
input validation, and the key/shape checks of load_into."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.clip import CLIPEncoder, resize_clip_pos
from model.config import preset
from model.sam import SAMEncoder, decomposed_rel_pos_bias, get_rel_pos, rel_pos_flash_attention, resize_abs_pos
from model.weights import CheckpointError, LoadReport, load_into

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = preset("tiny")
    return SAMEncoder(cfg.sam).eval(), CLIPEncoder(cfg.clip).eval()


@pytest.mark.parametrize("size", [512, 640, 1024, 1280])
def test_sam_then_clip_shapes_for_each_mode(tiny, size):
    sam, clip = tiny
    g = size // 64
    with torch.no_grad():
        neck = sam.forward_neck(torch.randn(1, 3, size, size))
        feats = sam.net_3(sam.net_2(neck))
        tokens = clip(None, patch_embeds=feats)
    assert neck.shape == (1, sam.cfg.neck_dim, size // 16, size // 16)
    assert feats.shape == (1, sam.cfg.net3_dim, g, g)
    assert tokens.shape == (1, 1 + g * g, clip.cfg.hidden_size)
    assert torch.isfinite(tokens).all()


def test_sam_forward_is_neck_then_compressor(tiny):
    sam, _ = tiny
    x = torch.randn(1, 3, 512, 512)
    with torch.no_grad():
        assert torch.equal(sam(x), sam.net_3(sam.net_2(sam.forward_neck(x))))


def test_sam_batch_items_are_independent(tiny):
    """Window partitioning must not mix images of a batch."""
    sam, _ = tiny
    x = torch.randn(2, 3, 640, 640)
    with torch.no_grad():
        both = sam(x)
        one = sam(x[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_sam_window_padding_for_non_dividing_window():
    cfg = dataclasses.replace(preset("tiny").sam, window_size=6)  # grid 40 pads to 42
    sam = SAMEncoder(cfg).eval()
    with torch.no_grad():
        out = sam(torch.randn(1, 3, 640, 640))
    assert out.shape == (1, cfg.net3_dim, 10, 10)


def test_sam_non_square_input(tiny):
    sam, clip = tiny
    with torch.no_grad():
        feats = sam(torch.randn(1, 3, 512, 640))
        tokens = clip(None, patch_embeds=feats)
    assert feats.shape[-2:] == (8, 10)
    assert tokens.shape == (1, 1 + 80, clip.cfg.hidden_size)


def test_encoders_backpropagate(tiny):
    cfg = preset("tiny")
    sam, clip = SAMEncoder(cfg.sam), CLIPEncoder(cfg.clip)
    clip(None, patch_embeds=sam(torch.randn(1, 3, 512, 512))).square().mean().backward()
    assert sam.pos_embed.grad is not None and sam.blocks[1].attn.rel_pos_h.grad.abs().sum() > 0
    assert clip.embeddings.position_embedding.weight.grad is not None


def test_position_tables_untouched_at_native_grid(tiny):
    sam, clip = tiny
    g = sam.cfg.pos_grid
    assert resize_abs_pos(sam.pos_embed, (g, g)) is sam.pos_embed
    table = clip.embeddings.position_embedding.weight
    assert resize_clip_pos(table, clip.cfg.pos_grid, (clip.cfg.pos_grid,) * 2) is table


def test_position_tables_resized_bicubic_antialias(tiny):
    sam, clip = tiny
    resized = resize_abs_pos(sam.pos_embed, (20, 24))
    expected = F.interpolate(sam.pos_embed.permute(0, 3, 1, 2), size=(20, 24), mode="bicubic",
                             antialias=True, align_corners=False).permute(0, 2, 3, 1)
    assert resized.shape == (1, 20, 24, sam.cfg.embed_dim)
    assert torch.allclose(resized, expected)
    table = clip.embeddings.position_embedding.weight
    g = clip.cfg.pos_grid
    out = resize_clip_pos(table, g, (4, 6))
    assert out.shape == (1 + 24, clip.cfg.hidden_size)
    assert torch.equal(out[0], table[0])  # CLS position kept
    grid = F.interpolate(table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(4, 6), mode="bicubic",
                         antialias=True, align_corners=False)
    assert torch.allclose(out[1:], grid.permute(0, 2, 3, 1).reshape(24, -1))


def test_position_resize_keeps_dtype_and_computes_in_fp32():
    table = torch.randn(1, 8, 8, 4).to(torch.bfloat16)
    out = resize_abs_pos(table, (5, 5))
    ref = F.interpolate(table.float().permute(0, 3, 1, 2), size=(5, 5), mode="bicubic", antialias=True,
                        align_corners=False).to(torch.bfloat16).permute(0, 2, 3, 1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_rel_pos_lookup_and_interpolation():
    table = torch.arange(7.0)[:, None].repeat(1, 2)  # 2*4-1 rows, row r holds value r
    rel = get_rel_pos(4, 4, table)
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(rel[..., 0], (i - j + 3).float())  # offset i-j, shifted by k-1
    longer = get_rel_pos(6, 6, table)  # needs 11 rows: interpolated linearly
    assert longer.shape == (6, 6, 2)
    assert longer[0, 0, 0] > longer[0, 5, 0] and longer[5, 0, 0] > longer[0, 0, 0]


def test_rel_pos_fold_matches_the_bias_path():
    """SAM's CUDA path folds the decomposed relative positions into wider dot products
    ([scale*q, Rh(q), Rw(q)] . [k, onehot(kh), onehot(kw)]); on a non-square grid it must give the
    bias path's attention and gradients, with v padded to the wide head or left at its own
    (``narrow_v``). Run here in fp32 on the CPU (the bf16 check on a GPU is bench/sam_attention.py)."""
    torch.manual_seed(0)
    h, w, d = 4, 6, 8
    inputs = [torch.randn(2, 3, h * w, d) for _ in range(3)] + [torch.randn(2 * h - 1, d) * 0.5,
                                                                 torch.randn(2 * w - 1, d) * 0.5]
    results = []
    for fold in (False, True, "narrow-v"):
        q, k, v, rph, rpw = (x.clone().requires_grad_(True) for x in inputs)
        if fold:
            out = rel_pos_flash_attention(q, k, v, rph, rpw, (h, w), narrow_v=fold == "narrow-v")
        else:
            bias = decomposed_rel_pos_bias(q, rph, rpw, (h, w), (h, w))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            assert (F.scaled_dot_product_attention(q, k, v) - out).abs().max() > 0.1  # the positions matter here
        results.append([out, *torch.autograd.grad(out.square().sum(), [q, k, v, rph, rpw])])
    for got_all in results[1:]:
        for name, ref, got in zip(["out", "q", "k", "v", "rel_pos_h", "rel_pos_w"], results[0], got_all):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)


def test_sam_global_attention_switch_is_checked_at_import():
    """NANO_OCR_SAM_GLOBAL_ATTENTION picks the global blocks' CUDA path; a misspelt one must not
    quietly run the default."""
    def import_with(value: str) -> subprocess.CompletedProcess:
        code = "import model.sam as s; print(s.CUDA_REL_POS_PATH['global'])"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "NANO_OCR_SAM_GLOBAL_ATTENTION": value})

    ok = import_with("fold-narrow-v")
    assert ok.returncode == 0 and ok.stdout.strip() == "fold-narrow-v"
    bad = import_with("fold_narrow_v")
    assert bad.returncode != 0 and "expected one of fold, fold-narrow-v, triton" in bad.stderr


def test_sam_blocks_know_their_attention_kind():
    """Each block takes its CUDA path (model.sam.CUDA_REL_POS_PATH) by kind: window or global."""
    cfg = dataclasses.replace(preset("tiny").sam, depth=3, global_attn_indexes=(1,))
    assert [b.attn.global_attention for b in SAMEncoder(cfg).blocks] == [False, True, False]


def test_clip_pixel_path_shapes(tiny):
    _, clip = tiny
    native = clip.cfg.image_size
    with torch.no_grad():
        assert clip(torch.randn(2, 3, native, native)).shape == (2, 1 + clip.cfg.pos_grid ** 2, clip.cfg.hidden_size)
        assert clip(torch.randn(1, 3, 14 * 4, 14 * 6)).shape == (1, 25, clip.cfg.hidden_size)


# ----------------------------------------------------------------------------- input validation


@pytest.mark.parametrize("shape, words", [
    ((1, 1, 512, 512), "3 channels"),
    ((1, 4, 512, 512), "3 channels"),
    ((1, 3, 500, 512), "multiples of 64"),
    ((1, 3, 512, 520), "multiples of 64"),
    ((3, 512, 512), "[B, 3, H, W]"),
])
def test_sam_rejects_bad_inputs_naming_the_shape(tiny, shape, words):
    sam, _ = tiny
    with pytest.raises(ValueError) as err:
        sam(torch.zeros(shape))
    assert words in str(err.value) and str(tuple(shape)) in str(err.value)


def test_clip_rejects_bad_inputs(tiny):
    _, clip = tiny
    with pytest.raises(ValueError, match="pixel_values or patch_embeds"):
        clip(None)
    with pytest.raises(ValueError, match=r"patch_embeds \[B, 64, h, w\]; got shape \(1, 32, 4, 4\)"):
        clip(None, patch_embeds=torch.zeros(1, 32, 4, 4))
    with pytest.raises(ValueError, match=r"multiples of patch 14; got shape \(1, 3, 100, 112\)"):
        clip(torch.zeros(1, 3, 100, 112))


# ----------------------------------------------------------------------------- load_into


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_load_into_copies_and_reports(tiny):
    _, clip = tiny
    fresh = CLIPEncoder(clip.cfg)
    state = _state(clip)
    state["embeddings.position_ids"] = torch.arange(3)
    report = load_into(fresh, state, "clip", ignore_prefixes=("embeddings.position_ids",))
    assert isinstance(report, LoadReport)
    assert report.ignored == ["embeddings.position_ids"] and not report.missing and not report.unexpected
    assert len(report.loaded) == len(clip.state_dict())
    for k, v in clip.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_load_into_casts_dtype(tiny):
    _, clip = tiny
    fresh = CLIPEncoder(clip.cfg)
    load_into(fresh, {k: v.to(torch.bfloat16) for k, v in _state(clip).items()}, "clip")
    assert fresh.pre_layrnorm.weight.dtype == torch.float32
    assert torch.equal(fresh.pre_layrnorm.weight, clip.pre_layrnorm.weight.to(torch.bfloat16).float())


def test_load_into_names_missing_key(tiny):
    _, clip = tiny
    state = _state(clip)
    del state["transformer.layers.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"clip: 1 missing keys: \[transformer\.layers\.1\.mlp\.fc2\.bias\]"):
        load_into(CLIPEncoder(clip.cfg), state, "clip")


def test_load_into_names_unexpected_key(tiny):
    sam, _ = tiny
    state = _state(sam)
    state["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"sam: 1 unexpected keys: \[blocks\.9\.attn\.qkv\.weight\]"):
        load_into(SAMEncoder(sam.cfg), state, "sam")


def test_load_into_names_shape_mismatch_even_when_not_strict(tiny):
    _, clip = tiny
    state = _state(clip)
    state["embeddings.position_embedding.weight"] = torch.zeros(257, 1024)
    msg = r"shape mismatch embeddings\.position_embedding\.weight: checkpoint \(257, 1024\) vs model \(257, 64\)"
    with pytest.raises(CheckpointError, match=msg):
        load_into(CLIPEncoder(clip.cfg), state, "clip", strict=False)


def test_load_into_lists_every_problem_at_once(tiny):
    _, clip = tiny
    state = _state(clip)
    del state["pre_layrnorm.weight"]
    state["extra.weight"] = torch.zeros(2)
    state["pre_layrnorm.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        load_into(CLIPEncoder(clip.cfg), state, "clip")
    message = str(err.value)
    assert "pre_layrnorm.weight" in message and "extra.weight" in message and "pre_layrnorm.bias" in message


def test_load_into_non_strict_keeps_init_and_reports(tiny):
    sam, _ = tiny
    fresh = SAMEncoder(sam.cfg)
    before = fresh.net_3.weight.clone()
    state = {k: v for k, v in _state(sam).items() if not k.startswith("net_")}
    report = load_into(fresh, state, "sam", strict=False)
    assert sorted(report.missing) == ["net_2.weight", "net_3.weight"]
    assert torch.equal(fresh.net_3.weight, before)
    assert torch.equal(fresh.pos_embed, sam.pos_embed)
