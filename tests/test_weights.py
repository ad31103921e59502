"""Checkpoint I/O: our directories round-trip bit-exactly; nanochat checkpoints load strictly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model.config import GPTConfig, preset
from model.gpt import GPT
from model.vlm import NanoDeepseekOCR
from model.weights import CheckpointError, load_checkpoint, load_nanochat, save_checkpoint

NANOCHAT_KEYS_D2 = [
    "transformer.wte.weight", "lm_head.weight",
    *[f"transformer.h.{i}.{k}.weight" for i in range(2)
      for k in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")],
]


def _tiny_vlm(seed: int = 0) -> NanoDeepseekOCR:
    torch.manual_seed(seed)
    model = NanoDeepseekOCR(preset("tiny"))
    model.init_weights()
    return model


def test_own_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = _tiny_vlm()
    save_checkpoint(tmp_path / "ckpt", model, extra={"processor": {"mode": "tiny"}, "step": 7})
    loaded, tokenizer, meta = load_checkpoint(tmp_path / "ckpt")
    assert tokenizer is None and meta["step"] == 7 and meta["processor"]["mode"] == "tiny"
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    ids = torch.randint(0, 100, (1, 8))
    assert torch.equal(model(ids), loaded(ids))  # rotary tables rebuilt after the meta-device build


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tmp_path / "ckpt", _tiny_vlm())
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "ckpt")
    # weights of another shape: the config says one thing, the tensors another
    save_checkpoint(tmp_path / "other", _tiny_vlm())
    meta = json.loads((tmp_path / "other" / "config.json").read_text())
    meta["model"]["gpt"]["n_embd"] = 256
    meta["model"]["gpt"]["n_head"] = 4
    meta["model"]["gpt"]["n_kv_head"] = 4
    (tmp_path / "other" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape mismatch gpt.transformer.wte.weight"):
        load_checkpoint(tmp_path / "other")


def _write_nanochat(directory, step: int, model: GPT, compiled: bool = True, extra_key: str | None = None):
    state = {("_orig_mod." if compiled else "") + k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    if extra_key:
        state[extra_key] = torch.zeros(1)
    torch.save(state, directory / f"model_{step:06d}.pt")
    meta = {"step": step, "val_bpb": 1.23, "model_config": model.config.nanochat_dict(),
            "user_config": {"depth": 2}, "device_batch_size": 32, "max_seq_len": 256}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))


def test_nanochat_checkpoint_with_v1_keys_loads_strictly(tmp_path):
    cfg = GPTConfig(sequence_len=256, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    torch.manual_seed(1)
    source = GPT(cfg)
    source.init_weights()
    for p in source.parameters():
        torch.nn.init.normal_(p, std=0.02)
    assert sorted(source.state_dict().keys()) == sorted(NANOCHAT_KEYS_D2)  # nanochat's own names
    _write_nanochat(tmp_path, 100, source)
    _write_nanochat(tmp_path, 250, source)
    model, meta = load_nanochat(tmp_path)
    assert meta["step"] == 250 and model.config.vocab_size == 320 and model.config.n_layer == 2
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert load_nanochat(tmp_path, step=100)[1]["step"] == 100


def test_nanochat_errors(tmp_path):
    cfg = GPTConfig(sequence_len=64, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    source = GPT(cfg)
    with pytest.raises(CheckpointError, match="no model_XXXXXX.pt"):
        load_nanochat(tmp_path)
    _write_nanochat(tmp_path, 5, source, extra_key="transformer.h.9.attn.c_q.weight")
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        load_nanochat(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint for step 6"):
        load_nanochat(tmp_path, step=6)
    (tmp_path / "meta_000005.json").unlink()
    with pytest.raises(CheckpointError, match="meta_000005.json is missing"):
        load_nanochat(tmp_path)


def test_saved_tensors_carry_the_release_key_names(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _tiny_vlm())
    keys = load_file(str(tmp_path / "ckpt" / "model.safetensors")).keys()
    for prefix in ("sam_model.net_3.weight", "vision_model.transformer.layers.0.self_attn.qkv_proj.weight",
                   "projector.layers.weight", "image_newline", "view_seperator"):
        assert prefix in keys
