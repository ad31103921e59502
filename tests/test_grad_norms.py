"""Pre-clip gradient norms by model part (pipeline.grad_norms): every parameter has a part, and
the parts' norms make up the norm that clipping sees."""

from __future__ import annotations

import math

import numpy as np
import torch

from model.config import preset
from model.vlm import ImageViews, NanoDeepseekOCR
from pipeline.glyph_loss import ATTRIBUTE, GlyphHeads
from pipeline.glyphs import char_class
from pipeline.grad_norms import PARTS, parameters_by_part, part_grad_norms, part_of, part_weight_norms


def _model_with_heads() -> NanoDeepseekOCR:
    torch.manual_seed(0)
    model = NanoDeepseekOCR(preset("tiny"))
    model.init_weights()
    heads = GlyphHeads(model.config, "grid")
    setattr(model, ATTRIBUTE, heads)
    heads.attach(model)
    return model


def test_every_parameter_has_a_part():
    model = _model_with_heads()
    parts = {part_of(name) for name, _ in model.named_parameters()}
    assert parts == set(PARTS), parts
    assert part_of("sam_model.net_2.weight") == "compressor" and part_of("sam_model.neck.0.weight") == "sam"
    assert part_of("something.new") == "other"


def _backward(model: NanoDeepseekOCR) -> None:
    """A glyph loss (the vision parts and the heads) plus a text-only next-token loss (the GPT)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(512, 512, 3), dtype=np.uint8)
    glyphs = np.asarray([(char_class(c), 60 + 100 * k, 100, 140) for k, c in enumerate("abcd")], np.float32)
    model.encode_images([ImageViews.from_arrays(pixels, None)])
    glyph_loss, _ = model.glyph_heads.loss([glyphs])
    ids = torch.as_tensor(rng.integers(5, model.config.gpt.vocab_size, size=(1, 24)))
    (glyph_loss + model(ids, None, ids.roll(-1, 1))).backward()


def test_part_norms_make_up_the_clipped_norm():
    model = _model_with_heads()
    _backward(model)
    norms = part_grad_norms(parameters_by_part(model))
    assert set(norms) == {f"grad_norm_{p}" for p in PARTS}, norms
    assert all(float(v) > 0 for v in norms.values()), norms
    total = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    assert float(total) > 1.0  # clipped: the parts' norms were taken before
    assert math.isclose(math.hypot(*(float(v) for v in norms.values())), float(total), rel_tol=1e-5)


def test_frozen_parts_and_parts_without_gradients_are_left_out():
    model = _model_with_heads()
    model.freeze_stage2()  # SAM and the compressor
    parts = parameters_by_part(model)
    assert "sam" not in parts and "compressor" not in parts
    assert part_grad_norms(parts) == {}  # no backward yet
    _backward(model)
    assert set(part_grad_norms(parts)) == {f"grad_norm_{p}" for p in ("clip", "projector", "gpt", "glyph_heads")}


def test_weight_norms_by_part_are_the_norms_of_the_parts_weights():
    model = _model_with_heads()
    norms = part_weight_norms(parameters_by_part(model))  # no gradient needed
    assert set(norms) == {f"weight_norm_{p}" for p in PARTS}, norms
    for part in PARTS:
        weights = torch.cat([p.detach().double().flatten() for n, p in model.named_parameters() if part_of(n) == part])
        assert math.isclose(float(norms[f"weight_norm_{part}"]), float(weights.norm()), rel_tol=1e-5), part
