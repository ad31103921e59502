"""Optimizer groups: the vision encoders' lr can be held at 0 while the rest trains."""

import copy

import numpy as np
import pytest
import torch

from model.config import preset
from model.vlm import ImageViews, NanoDeepseekOCR
from pipeline.optim import build_optimizer, set_lr


def _model() -> NanoDeepseekOCR:
    cfg = preset("tiny")
    cfg.gpt.vocab_size = 64
    torch.manual_seed(0)
    model = NanoDeepseekOCR(cfg)
    model.init_weights()
    return model


def _step(model: NanoDeepseekOCR, optimizer) -> None:
    """One update on a loss that reaches every vision part (SAM, CLIP, projector)."""
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    slots = model.encode_images([ImageViews.from_arrays(pixels, None)])[0]
    slots.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _changed(before: dict, model: NanoDeepseekOCR, prefix: str) -> bool:
    return any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_encoder_multiplier_zero_holds_sam_and_clip_still(name):
    model = _model()
    optimizer = build_optimizer(model, name, lr=1e-3, weight_decay=0.1)
    lr = set_lr(optimizer, 0.5, encoder_multiplier=0.0)
    assert lr == pytest.approx(0.5e-3)
    assert {g["lr"] for g in optimizer.param_groups if g.get("encoder")} == {0.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, optimizer)
    assert not _changed(before, model, "sam_model.") and not _changed(before, model, "vision_model.")
    assert _changed(before, model, "projector.")  # the rest trains

    set_lr(optimizer, 0.5)  # the warmup is over: the encoders move again
    _step(model, optimizer)
    assert _changed(before, model, "sam_model.") and _changed(before, model, "vision_model.")


def test_optimizer_state_saved_without_encoder_flags_keeps_them():
    """Checkpoints written before the flag existed still resume with SAM/CLIP told apart."""
    model = _model()
    optimizer = build_optimizer(model, "muon", lr=1e-3)
    flags = [g.get("encoder") for g in optimizer.param_groups]
    assert True in flags and False in flags
    state = copy.deepcopy(optimizer.state_dict())
    for part in state["optimizers"]:
        for g in part["param_groups"]:
            g.pop("encoder", None)
    fresh = build_optimizer(model, "muon", lr=1e-3)
    fresh.load_state_dict(state)
    assert [g.get("encoder") for g in fresh.param_groups] == flags
    set_lr(fresh, 1.0, encoder_multiplier=0.0)
    assert all(g["lr"] == 0.0 for g in fresh.param_groups if g.get("encoder"))
    assert all(g["lr"] > 0.0 for g in fresh.param_groups if not g.get("encoder"))
