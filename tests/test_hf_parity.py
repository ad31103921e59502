"""Acceptance: our SAM and CLIP encoders, loaded by our importers, match Hugging Face transformers.

Each test builds a tiny random transformers model, saves it with save_pretrained (safetensors),
imports it, and compares outputs in fp32. Plus the DeepSeek-OCR layout round trip and the
checkpoint discovery rules (shards, .bin fallback, the hub cache).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from model.clip import CLIPEncoder  # noqa: E402
from model.config import CLIPConfig, SAMConfig, preset  # noqa: E402
from model.sam import SAMEncoder  # noqa: E402
from model.weights import (  # noqa: E402
    CheckpointError,
    import_clip,
    import_sam,
    load_clip,
    load_deepseek_ocr_vision,
    load_sam,
    resolve_source,
)

TOL = 1e-4


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random values in every tensor (HF zero-inits pos_embed/rel_pos: those must be exercised too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _hf_sam_config(**overrides):
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, window_size=6,
                  global_attn_indexes=[1], image_size=256, patch_size=16, output_channels=16)
    values.update(overrides)
    return transformers.SamVisionConfig(**values)


@pytest.fixture(scope="module")
def hf_sam(tmp_path_factory):
    """A tiny random SamVisionModel saved to disk: (model, directory). Window 6 does not divide grid 16."""
    torch.manual_seed(0)
    model = transformers.SamVisionModel(_hf_sam_config()).eval()
    _randomize(model, 1)
    path = tmp_path_factory.mktemp("hf_sam")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=112, patch_size=14,
                                        hidden_act="quick_gelu")
    model = transformers.CLIPVisionModel(cfg).eval()
    _randomize(model, 2)
    path = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(path)
    return model, path


# ----------------------------------------------------------------------------- CLIP


def test_clip_matches_hf_clip_vision_model(hf_clip):
    hf, path = hf_clip
    ours, report = import_clip(path)
    ours.eval()
    assert ours.cfg == CLIPConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                                  image_size=112, patch_size=14, layer_norm_eps=1e-5)
    assert "post_layernorm.weight" in report.ignored and not report.missing
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == expected.shape == (2, 1 + 64, 64)
    assert (got - expected).abs().max().item() < TOL


def test_clip_patch_embeds_path_equals_pixel_path(hf_clip):
    _, path = hf_clip
    ours = load_clip(path).eval()
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        embeds = ours.embeddings.patch_embedding(pixels)
        assert torch.equal(ours(None, patch_embeds=embeds), ours(pixels))
        # when patch_embeds are given, pixel_values are not used
        assert torch.equal(ours(torch.zeros(1, 3, 112, 112), patch_embeds=embeds), ours(pixels))


def test_clip_from_full_clip_model_ignores_text_tower(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=8,
    )
    hf = transformers.CLIPModel(cfg).eval()
    _randomize(hf, 4)
    hf.save_pretrained(tmp_path)
    ours, report = import_clip(tmp_path)
    assert ours.cfg.hidden_size == 32 and ours.cfg.image_size == 56
    assert any(k.startswith("text_model.") for k in report.ignored)
    assert {"vision_model.post_layernorm.weight", "visual_projection.weight", "logit_scale"} <= set(report.ignored)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=pixels).last_hidden_state
        got = ours.eval()(pixels)
    assert (got - expected).abs().max().item() < TOL


def test_clip_refuses_other_activations(tmp_path):
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14, hidden_act="gelu")
    transformers.CLIPVisionModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        load_clip(tmp_path)


def test_clip_bin_fallback_uses_weights_only_torch_load(hf_clip, tmp_path):
    hf, path = hf_clip
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ours = load_clip(tmp_path).eval()
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert (ours(pixels) - hf(pixel_values=pixels).last_hidden_state).abs().max().item() < TOL


# ----------------------------------------------------------------------------- SAM


def test_sam_neck_matches_hf_sam_vision_model(hf_sam):
    hf, path = hf_sam
    ours, report = import_sam(path)
    ours.eval()
    assert ours.cfg == SAMConfig(img_size=256, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                                 window_size=6, global_attn_indexes=(1,), neck_dim=16, net2_dim=32, net3_dim=64)
    assert sorted(report.missing) == ["net_2.weight", "net_3.weight"]  # SAM has no compressor
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        got = ours.forward_neck(pixels)
    assert got.shape == expected.shape == (2, 16, 16, 16)
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("size", [192, 320])
def test_sam_neck_matches_hf_layers_at_other_resolutions(hf_sam, size):
    """HF's SamVisionModel refuses other sizes, but its layers and neck run at any grid.

    Driving them by hand with the reference's position rule (bicubic + antialias in fp32) checks
    window padding and the interpolated relative positions of the global block against HF.
    """
    hf, path = hf_sam
    ours = load_sam(path).eval()
    enc = hf.vision_encoder
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    grid = size // 16
    with torch.no_grad():
        x = enc.patch_embed.projection(pixels).permute(0, 2, 3, 1)
        pos = F.interpolate(enc.pos_embed.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic",
                            antialias=True, align_corners=False).permute(0, 2, 3, 1)
        x = x + pos
        for layer in enc.layers:
            x = layer(x)
        expected = enc.neck(x)
        got = ours.forward_neck(pixels)
    assert got.shape == expected.shape == (1, 16, grid, grid)
    assert (got - expected).abs().max().item() < TOL


def test_sam_from_full_sam_model_ignores_prompt_and_mask_heads(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.SamConfig(
        vision_config=_hf_sam_config(image_size=128, window_size=4).to_dict(),
        prompt_encoder_config=dict(hidden_size=16, image_size=128, patch_size=16),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    hf = transformers.SamModel(cfg).eval()
    _randomize(hf, 6)
    hf.save_pretrained(tmp_path)
    ours, report = import_sam(tmp_path)
    assert any(k.startswith("mask_decoder.") for k in report.ignored)
    assert any(k.startswith("prompt_encoder.") for k in report.ignored)
    pixels = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = hf.vision_encoder(pixel_values=pixels).last_hidden_state
        got = ours.eval().forward_neck(pixels)
    assert (got - expected).abs().max().item() < TOL


def test_sam_into_given_model_with_wrong_config_names_the_tensor(hf_sam):
    _, path = hf_sam
    wrong = SAMEncoder(SAMConfig(img_size=512, embed_dim=32, depth=2, num_heads=2, window_size=6,
                                 global_attn_indexes=(1,), neck_dim=16, net2_dim=32, net3_dim=64))
    with pytest.raises(CheckpointError, match=r"shape mismatch pos_embed: checkpoint \(1, 16, 16, 32\) vs model "
                                              r"\(1, 32, 32, 32\)"):
        load_sam(path, model=wrong)


# ----------------------------------------------------------------------------- DeepSeek-OCR layout


def _deepseek_modules(seed: int):
    torch.manual_seed(seed)
    cfg = preset("tiny")
    sam, clip = SAMEncoder(cfg.sam), CLIPEncoder(cfg.clip)
    projector = torch.nn.Linear(cfg.projector_in, cfg.gpt.n_embd)
    newline = torch.nn.Parameter(torch.randn(cfg.gpt.n_embd))
    separator = torch.nn.Parameter(torch.randn(cfg.gpt.n_embd))
    return sam, clip, projector, newline, separator


LM_KEYS = {"model.embed_tokens.weight": (50, 128), "model.layers.0.self_attn.q_proj.weight": (128, 128),
           "model.norm.weight": (128,), "lm_head.weight": (50, 128)}


def _write_deepseek_checkpoint(directory, seed=0, sharded=True, drop=()):
    sam, clip, projector, newline, separator = _deepseek_modules(seed)
    tensors = {f"model.sam_model.{k}": v for k, v in sam.state_dict().items()}
    tensors |= {f"model.vision_model.{k}": v for k, v in clip.state_dict().items()}
    tensors |= {f"model.projector.layers.{k}": v for k, v in projector.state_dict().items()}
    tensors |= {"model.image_newline": newline.detach(), "model.view_seperator": separator.detach()}
    tensors |= {k: torch.randn(shape) for k, shape in LM_KEYS.items()}
    tensors = {k: v.clone().contiguous() for k, v in tensors.items() if k not in drop}
    if sharded:  # vision in one shard, the LM in another, tied by an index
        vision = {k: v for k, v in tensors.items() if k not in LM_KEYS}
        lm = {k: v for k, v in tensors.items() if k in LM_KEYS}
        save_file(vision, str(directory / "model-00001-of-00002.safetensors"))
        save_file(lm, str(directory / "model-00002-of-00002.safetensors"))
        weight_map = {k: "model-00001-of-00002.safetensors" for k in vision}
        weight_map |= {k: "model-00002-of-00002.safetensors" for k in lm}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(tensors, str(directory / "model-00001-of-000001.safetensors"))
    return tensors


@pytest.mark.parametrize("sharded", [True, False])
def test_deepseek_ocr_round_trip(tmp_path, sharded):
    tensors = _write_deepseek_checkpoint(tmp_path, seed=0, sharded=sharded)
    sam, clip, projector, newline, separator = _deepseek_modules(seed=1)  # different random values
    report = load_deepseek_ocr_vision(tmp_path, sam, clip, projector, newline, separator)
    for prefix, module in (("model.sam_model.", sam), ("model.vision_model.", clip),
                           ("model.projector.layers.", projector)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, tensors[prefix + k]), prefix + k
    assert torch.equal(newline.detach(), tensors["model.image_newline"])
    assert torch.equal(separator.detach(), tensors["model.view_seperator"])
    assert set(report.ignored) == set(LM_KEYS)
    assert len(report.loaded) == len(tensors) - len(LM_KEYS)
    assert not report.missing and not report.unexpected


def test_deepseek_ocr_skipped_parts_are_reported_ignored(tmp_path):
    _write_deepseek_checkpoint(tmp_path, sharded=False)
    sam, clip, *_ = _deepseek_modules(seed=1)
    report = load_deepseek_ocr_vision(tmp_path, sam, clip)
    assert {"model.projector.layers.weight", "model.image_newline", "model.view_seperator"} <= set(report.ignored)


def test_deepseek_ocr_missing_vision_key_is_named(tmp_path):
    _write_deepseek_checkpoint(tmp_path, sharded=False, drop=("model.vision_model.pre_layrnorm.bias",))
    sam, clip, projector, newline, separator = _deepseek_modules(seed=1)
    with pytest.raises(CheckpointError, match=r"clip: 1 missing keys: \[pre_layrnorm\.bias\]"):
        load_deepseek_ocr_vision(tmp_path, sam, clip, projector, newline, separator)


def test_deepseek_ocr_refuses_other_checkpoints(hf_clip):
    _, path = hf_clip
    sam, clip, *_ = _deepseek_modules(seed=1)
    with pytest.raises(CheckpointError, match="not a DeepSeek-OCR checkpoint"):
        load_deepseek_ocr_vision(path, sam, clip)


# ----------------------------------------------------------------------------- finding checkpoints


def test_resolve_source_local_dir_and_hub_cache(tmp_path, hf_clip):
    _, path = hf_clip
    assert resolve_source(path) == path
    # a hub cache laid out as huggingface_hub writes it, resolved offline
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--tiny-org--tiny-clip"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((path / name).read_bytes())
    found = resolve_source("tiny-org/tiny-clip", cache_dir=tmp_path / "cache", allow_download=False)
    assert found == snapshot
    assert load_clip(found).cfg.hidden_size == 64


def test_resolve_source_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_source(tmp_path / "nope" / "deeper")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        resolve_source("nobody-org/no-such-model", cache_dir=tmp_path, allow_download=False)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_clip(tmp_path, config=preset("tiny").clip)
