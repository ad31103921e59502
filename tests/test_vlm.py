"""The assembled VLM: slot layout in DeepSeek-OCR's order, stage-2 freezing, it learns."""

import time

import numpy as np
import pytest
import torch

from model.config import preset, processor_config
from model.processor import ImageProcessor
from model.vlm import ImageViews, NanoDeepseekOCR, normalize, slot_count


def _model(seed=0, image_token_id=5, vocab=64):
    cfg = preset("tiny")
    cfg.gpt.vocab_size = vocab
    cfg.image_token_id = image_token_id
    torch.manual_seed(seed)
    m = NanoDeepseekOCR(cfg)
    m.init_weights()
    return m


def _views(size=512, tiles=0, crop=(1, 1), tile=640, seed=0):
    g = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    t = np.random.default_rng(seed + 1).integers(0, 256, (tiles, tile, tile, 3), dtype=np.uint8) if tiles else None
    return ImageViews.from_arrays(g, t, crop)


def test_slot_counts_match_reference_table():
    m = _model()
    for size, expected in [(512, 73), (640, 111), (1024, 273)]:
        assert m.encode_images([_views(size)])[0].shape == (expected, 128)
    gundam = m.encode_images([_views(1024, tiles=4, crop=(2, 2))])[0]
    assert gundam.shape[0] == 693 == slot_count(16, 10, (2, 2), 4)


def test_layout_is_local_rows_then_global_rows_then_separator():
    m = _model()
    views = _views(1024, tiles=6, crop=(3, 2), seed=3)  # 3 cols x 2 rows
    seq = m.encode_images([views])[0]
    nl, sep = m.image_newline, m.view_seperator
    q, g = 10, 16
    local_rows, local_width = 2 * q, 3 * q + 1
    local = seq[: local_rows * local_width].view(local_rows, local_width, -1)
    assert torch.equal(local[:, -1], nl.expand(local_rows, -1))  # newline closes every stitched row
    glob = seq[local_rows * local_width: -1].view(g, g + 1, -1)
    assert torch.equal(glob[:, -1], nl.expand(g, -1))
    assert torch.equal(seq[-1], sep)
    # the stitched local grid: tile (row r, col c) lands at rows r*q.., cols c*q..
    tile_feats = m._encode_views((views.tiles.float() / 127.5) - 1)  # [6, q*q, C]
    for r in range(2):
        for c in range(3):
            expect = tile_feats[r * 3 + c].view(q, q, -1)
            got = local[r * q:(r + 1) * q, c * q:(c + 1) * q]
            assert torch.allclose(got, expect, atol=1e-5)


def test_batched_encoding_equals_one_by_one():
    m = _model()
    # the 640 global encodes in one call with the 640 tiles of the 1024 page
    imgs = [_views(512, seed=1), _views(1024, tiles=2, crop=(2, 1), seed=2), _views(512, seed=4),
            _views(640, seed=7)]
    together = m.encode_images(imgs)
    for im, t in zip(imgs, together):
        assert torch.allclose(m.encode_images([im])[0], t, atol=1e-5)


def test_fixed_view_chunks_pad_without_changing_features():
    """compile_vision's static chunks: views go through the towers exactly ``chunk`` at a time
    (the last chunk padded with blank views), and every image's embeddings stay the same."""
    m = _model()
    imgs = [_views(512, seed=1), _views(1024, tiles=3, crop=(3, 1), seed=2), _views(512, seed=4),
            _views(512, seed=5), _views(512, seed=6)]
    plain = m.encode_images(imgs)
    seen = []
    hook = m.sam_model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    m.view_chunk = 3
    chunked = m.encode_images(imgs)
    hook.remove()
    # four 512 globals: 3 + (1 + 2 blank); the 1024 global: 1 + 2 blank; three 640 tiles: 3
    assert seen == [3, 3, 3, 3]
    for a, b in zip(plain, chunked):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="chunk"):
        m.compile_vision(-1)


def test_vision_compiled_by_block_matches_eager_and_compiles_each_kind_of_block_once():
    """compile_vision(unit="block"): the same embeddings and gradients as eager, one graph per kind
    of block (SAM's window and global blocks, CLIP's layer), none new for another view count.
    ``aot_eager`` runs dynamo and AOTAutograd without inductor's code generation."""
    import dataclasses

    from torch._dynamo.utils import counters

    def model() -> NanoDeepseekOCR:
        cfg = preset("tiny")
        cfg.sam = dataclasses.replace(cfg.sam, depth=3, global_attn_indexes=(1,))
        torch.manual_seed(0)
        m = NanoDeepseekOCR(cfg)
        m.init_weights()
        return m

    images = [_views(512, seed=s) for s in range(4)]
    eager, blocks = model(), model()
    torch._dynamo.reset()  # graphs that earlier tests compiled for these block classes would be reused
    counters.clear()
    blocks.compile_vision(0, backend="aot_eager", unit="block")
    graphs = []
    for n in (3, 2, 4):
        losses = []
        for m in (eager, blocks):
            loss = sum(e.square().mean() for e in m.encode_images(images[:n]))
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), blocks.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
        eager.zero_grad(set_to_none=True)
        blocks.zero_grad(set_to_none=True)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [3, 3, 3] and not counters["graph_break"]
    with pytest.raises(ValueError, match="unit must be one of"):
        model().compile_vision(0, unit="layer")


def test_slot_centering_shifts_each_view_to_a_zero_mean():
    """VLMConfig.slot_centering: every view's slots lose their common mean and nothing else (one
    shift per view, tiles and global alike), it survives config.json, and it is off by default
    (DeepSeek-OCR's weights were trained without it)."""
    from model.config import VLMConfig

    plain = _model()
    assert plain.config.slot_centering is False
    centred = _model()
    centred.config.slot_centering = True
    image = _views(1024, tiles=2, crop=(2, 1), seed=3)
    with torch.no_grad():
        a = plain._encode_view_batch(normalize(image.global_view[None]))  # [1, 256, D]
        b = centred._encode_view_batch(normalize(image.global_view[None]))
        tiles_b = centred._encode_view_batch(normalize(image.tiles))
    assert b.mean(dim=1).abs().max() < 1e-5
    assert tiles_b.mean(dim=1).abs().max() < 1e-5  # each tile on its own
    shift = a - b
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5)  # the same shift for every slot
    assert a.mean(dim=1).abs().max() > 1e-3  # there was a mean to remove
    again = VLMConfig.from_dict(centred.config.to_dict())
    assert again.slot_centering is True
    assert VLMConfig.from_dict({k: v for k, v in centred.config.to_dict().items() if k != "slot_centering"}) \
        .slot_centering is False  # checkpoints from before the option load as trained


def test_projector_input_norm_bounds_the_projector_input_and_adds_no_weights():
    """VLMConfig.projector_input_norm: CLIP's and SAM's channels are each layer-normalised before
    the projector, so the slots no longer follow the encoders' scale; the checkpoint keys stay,
    the option survives config.json, and it is off by default."""
    from model.config import VLMConfig
    from model.vlm import Projector

    plain = _model()
    assert plain.config.projector_input_norm is False
    config = VLMConfig.from_dict(plain.config.to_dict())
    config.projector_input_norm = True
    normed = NanoDeepseekOCR(config)
    assert normed.state_dict().keys() == plain.state_dict().keys()
    normed.load_state_dict(plain.state_dict())  # a plain checkpoint loads into it, strictly
    c = config.clip.hidden_size
    x = torch.randn(2, 5, config.projector_in)
    scaled = torch.cat([x[..., :c] * 1000.0 + 3.0, x[..., c:] * 0.2 - 2.0], dim=-1)  # each part on its own scale
    with torch.no_grad():
        assert torch.allclose(normed.projector(x), normed.projector(scaled), atol=1e-3)
        assert not torch.allclose(plain.projector(x), plain.projector(scaled), atol=1e-3)
    assert VLMConfig.from_dict(config.to_dict()).projector_input_norm is True
    assert VLMConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "projector_input_norm"}) \
        .projector_input_norm is False  # checkpoints from before the option load as trained
    with pytest.raises(ValueError, match="input_split must be inside"):
        Projector(8, 4, input_split=8)


def test_slot_mismatch_is_a_clear_error():
    m = _model()
    ids = torch.tensor([[1] + [5] * 10 + [2]])
    with pytest.raises(ValueError, match="10 <image> slots but the images give 73"):
        m(ids, [_views(512)])


def test_wrong_view_shape_is_a_clear_error():
    m = _model()
    bad = ImageViews(torch.zeros(4, 512, 512, dtype=torch.uint8), torch.zeros(0, 3, 1, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="global view"):
        m.encode_images([bad])


def test_freeze_stage2_freezes_exactly_sam_and_compressor():
    m = _model()
    frozen = set(m.freeze_stage2())
    for name, p in m.named_parameters():
        assert p.requires_grad == (name not in frozen)
        assert (name in frozen) == name.startswith("sam_model.")
    assert any("net_2" in n for n in frozen) and any("net_3" in n for n in frozen)


def test_tiny_forward_backward_is_fast_and_learns_a_fixed_batch():
    torch.manual_seed(0)
    m = _model(image_token_id=63)
    processor = ImageProcessor(processor_config("tiny"))
    page = np.full((300, 400, 3), 255, dtype=np.uint8)
    page[100:140, 50:350] = 0
    from PIL import Image

    views = ImageViews.from_processed(processor.process(Image.fromarray(page)))
    prompt = [1] + [63] * 73 + [7, 8]
    answer = [10, 11, 12, 13, 14, 15, 16, 17, 18, 2]
    ids = torch.tensor([prompt + answer])
    targets = torch.full_like(ids, -1)
    targets[0, len(prompt) - 1:-1] = torch.tensor(answer)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    start = time.perf_counter()
    loss = m(ids, [views], targets)
    loss.backward()
    first_step = time.perf_counter() - start
    assert first_step < 5.0, f"tiny forward+backward took {first_step:.2f}s"
    for _ in range(50):
        opt.zero_grad()
        loss = m(ids, [views], targets)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_asking_for_slot_centering_over_a_checkpoint_without_it_is_warned_about():
    import warnings

    from pipeline.train import TrainConfig, warn_config_ignored

    plain = _model().config  # trained without centering
    centred = _model().config
    centred.slot_centering = True
    with pytest.warns(UserWarning, match="slot_centering: true, but checkpoint ckpt/x was trained without it"):
        warn_config_ignored(TrainConfig(slot_centering=True), plain, "ckpt/x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_config_ignored(TrainConfig(slot_centering=False), plain, "ckpt/x")  # agrees
        warn_config_ignored(TrainConfig(stage=2, init_from="ckpt/x"), centred, "ckpt/x")  # stage 2 on defaults
        warn_config_ignored(TrainConfig(slot_centering=True), centred, "ckpt/x")
    with pytest.warns(UserWarning, match="projector_input_norm: true, but checkpoint ckpt/y was trained without"):
        warn_config_ignored(TrainConfig(projector_input_norm=True), centred, "ckpt/y")


def test_global_view_slots_reads_the_global_grid_back_with_or_without_tiles():
    from model.vlm import global_view_slots

    m = _model()
    for views, grid in [(_views(512), 8), (_views(1024, tiles=6, crop=(3, 2), seed=3), 16)]:
        with torch.no_grad():
            embeddings = m.encode_images([views])[0]
            expected = m._encode_view_batch(normalize(views.global_view[None]))[0]
        assert torch.allclose(global_view_slots(embeddings, grid), expected, atol=1e-5)
