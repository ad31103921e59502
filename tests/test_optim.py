"""Optimizer groups: the vision encoders' lr can be held at 0 while the rest trains; Muon's
batched step against its one-matrix-at-a-time definition."""

import copy

import numpy as np
import pytest
import torch

from model.config import preset
from model.vlm import ImageViews, NanoDeepseekOCR
from pipeline.optim import Muon, build_optimizer, lr_multiplier, orthogonalize, set_lr


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


def test_muon_batches_same_shape_matrices_without_changing_the_update():
    """Two steps of momentum + Nesterov + Newton-Schulz, matrix by matrix, as the oracle of the
    step that stacks matrices of one shape (three shapes here, one of them tall)."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 8), (16, 8), (8, 24), (8, 8), (16, 8)]
    params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    expected = [p.detach().clone() for p in params]
    bufs = [torch.zeros(s) for s in shapes]
    opt = Muon(params, lr=0.05)
    for _ in range(2):
        grads = [torch.randn(*s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            bufs[i] = bufs[i] * 0.95 + g * 0.05
            update = g * 0.05 + bufs[i] * 0.95
            scale = max(1.0, shapes[i][0] / shapes[i][1]) ** 0.5
            expected[i] = expected[i] - 0.05 * scale * orthogonalize(update)
    for p, e in zip(params, expected):
        assert torch.allclose(p.detach(), e, atol=1e-5), (p - e).abs().max()
    params[1].grad = None  # a matrix without a gradient is left alone
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)


def test_warmdown_holds_the_lr_then_falls_linearly_to_its_floor():
    total, warmup = 100, 10
    lrs = [lr_multiplier(s, total, "warmdown", warmup, min_frac=0.05, warmdown=0.4) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[warmup - 1] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[warmup:60])  # constant until the last 40%
    decay = lrs[60:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly falling ...
    assert np.allclose(np.diff(decay), decay[1] - decay[0])  # ... by the same amount each step
    assert decay[-1] == pytest.approx(0.05)  # the last step trains at the floor


def test_unknown_schedule_is_refused_before_training():
    from pipeline.train import TrainConfig

    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        TrainConfig(data="x", schedule="linear")
    with pytest.raises(ValueError, match="warmdown_frac"):
        TrainConfig(data="x", schedule="warmdown", warmdown_frac=0.0)
