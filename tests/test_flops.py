"""The FLOP counts behind the trainer's logged MFU and the benchmarks (model/flops.py), against
what torch's own FlopCounterMode counts for the same modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import preset
from model.flops import gpt_matmul_params, gpt_train_flops, packed_train_flops, segment_lengths, vision_flops
from model.vlm import ImageViews, NanoDeepseekOCR


@pytest.mark.parametrize("name,size", [("small", 640), ("small", 1024), ("full", 640), ("full", 1024)])
def test_vision_flops_equal_torchs_count_of_the_towers(name, size):
    """SAM + compressor + CLIP + projector on two views, counted on meta tensors (no arithmetic)."""
    cfg = preset(name)
    with torch.device("meta"):
        model = NanoDeepseekOCR(cfg).eval()
        views = torch.randn(2, 3, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model._encode_view_batch(views)
    assert counter.get_total_flops() == pytest.approx(2 * vision_flops(cfg, size), rel=1e-9)


def test_gpt_matmul_flops_equal_torchs_count():
    cfg = preset("tiny")
    model = NanoDeepseekOCR(cfg)
    tokens = 96
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.gpt(torch.randint(0, cfg.gpt.vocab_size, (1, tokens)))
    matmuls = sum(v for k, v in counter.get_flop_counts()["Global"].items() if str(k) in ("aten.mm", "aten.addmm"))
    assert matmuls == 2 * gpt_matmul_params(cfg) * tokens


def test_packed_train_flops_count_every_view_and_each_sample_alone():
    """3x the forward of each view (tiles too, by their own size) and the GPT's FLOPs per packed
    sample: padding (segment -1) is no sample, and attention does not cross samples."""
    cfg = preset("small")
    page = ImageViews(torch.zeros(3, 1024, 1024, dtype=torch.uint8), torch.zeros(2, 3, 640, 640, dtype=torch.uint8),
                      (2, 1))
    crop = ImageViews(torch.zeros(3, 640, 640, dtype=torch.uint8), torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, 2, 2]])
    assert segment_lengths(segments) == [3, 2, 6]
    vision = vision_flops(cfg, 1024) + 2 * vision_flops(cfg, 640) + 2 * vision_flops(cfg, 640)
    expected = 3 * vision + gpt_train_flops(cfg, [3, 2, 6])
    assert packed_train_flops(cfg, [page, crop, crop], segments) == pytest.approx(expected, rel=1e-12)
    assert gpt_train_flops(cfg, [3, 2, 6]) < gpt_train_flops(cfg, [11])  # attention per sample, not per row
