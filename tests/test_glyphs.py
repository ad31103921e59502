"""Glyph geometry and the training-only glyph heads (pipeline.glyphs, pipeline.glyph_loss): where
each character of a page lands in the global view, the cell/patch targets made from that, and
heads that read the towers through hooks and train the encoder."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.config import preset
from model.vlm import ImageViews, NanoDeepseekOCR
from pipeline.glyph_loss import GlyphHeads, balanced_patch_loss, split_state
from pipeline.glyphs import (CELL, N_CLASSES, PATCH, cell_targets, char_class, crop_page, decode_glyphs,
                             encode_glyphs, page_glyphs, patch_targets, patches_by_cell)
from pipeline.synth import SynthConfig, TextPiece, block_pieces, make_page, readable_pieces


def test_page_glyphs_follow_the_processors_square_padding():
    # a 200 x 100 page is padded to 200 x 200 (50 px above and below) and resized to 64
    page = SimpleNamespace(size=(200, 100),
                           words=[TextPiece("a b", (0, 0, 20, 10)), TextPiece("Z", (100, 90, 110, 100))])
    glyphs = page_glyphs(page, 64)
    np.testing.assert_allclose(glyphs, [[char_class("a"), 5 * 0.32, 16, 19.2], [char_class("b"), 15 * 0.32, 16, 19.2],
                                        [char_class("Z"), 105 * 0.32, 140 * 0.32, 150 * 0.32]], rtol=1e-6)
    assert char_class("é") == N_CLASSES - 1  # anything outside printable ASCII: "other"


def test_cell_and_patch_targets():
    view = 128  # 2 x 2 cells, 8 x 8 patches
    glyphs = np.array([[char_class("a"), 10, 4, 20],      # cell (0, 0), patch row 0 col 0
                       [char_class("b"), 70, 50, 80],     # spans cell rows 0 and 1 (middle half: 57.5-72.5), col 1
                       [char_class("c"), 71, 50, 80]],    # the same patch as b: the last one drawn wins
                      dtype=np.float32)
    cells = cell_targets(glyphs, view)
    assert cells.shape == (4, N_CLASSES)
    assert {(i, int(c)) for i, c in zip(*np.nonzero(cells))} == {
        (0, char_class("a")), (1, char_class("b")), (3, char_class("b")), (1, char_class("c")), (3, char_class("c"))}
    patches = patch_targets(glyphs, view)
    assert patches.shape == ((view // PATCH) ** 2,) and CELL == 4 * PATCH
    assert patches[0] == char_class("a") + 1
    assert patches[4 * 8 + 4] == char_class("c") + 1  # centre (71, 65)
    assert np.count_nonzero(patches) == 2


def _cells_one_by_one(glyphs: np.ndarray, view: int) -> np.ndarray:
    """The targets' definition, one glyph at a time (the oracle of the vectorised code)."""
    g = view // CELL
    out = np.zeros((g * g, N_CLASSES), dtype=np.uint8)
    for cls, x, top, bottom in glyphs.tolist():
        inset = (bottom - top) / 4
        col = min(g - 1, max(0, int(x // CELL)))
        for row in range(max(0, int((top + inset) // CELL)), min(g - 1, int((bottom - inset) // CELL)) + 1):
            out[row * g + col, int(cls)] = 1
    return out


def _patches_one_by_one(glyphs: np.ndarray, view: int) -> np.ndarray:
    gp = view // PATCH
    out = np.zeros(gp * gp, dtype=np.int64)
    for cls, x, top, bottom in glyphs.tolist():
        row, col = (min(gp - 1, max(0, int(v // PATCH))) for v in ((top + bottom) / 2, x))
        out[row * gp + col] = int(cls) + 1  # drawn in order: the last one wins
    return out


def test_targets_match_their_definition_on_random_glyphs():
    """Off the view, on the grid lines, tall, crowded into one patch, none at all."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        n, view = int(rng.integers(0, 120)), (512, 640, 1024)[trial % 3]
        x, top, height = rng.uniform(-40, view + 40, n), rng.uniform(-60, view + 20, n), rng.uniform(0, 150, n)
        if trial % 4 == 0:
            x, top, height = np.round(x / 16) * 16, np.round(top / 16) * 16, np.round(height / 8) * 8
        if trial % 7 == 0:
            x, top, height = rng.uniform(100, 110, n), rng.uniform(200, 204, n), np.full(n, 8.0)
        glyphs = np.stack([rng.integers(0, N_CLASSES, n), x, top, top + height], 1).astype(np.float32)
        np.testing.assert_array_equal(cell_targets(glyphs, view), _cells_one_by_one(glyphs, view))
        np.testing.assert_array_equal(patch_targets(glyphs, view), _patches_one_by_one(glyphs, view))
        np.testing.assert_array_equal(patches_by_cell(patch_targets(glyphs, view), view),
                                      _grid_one_by_one(glyphs, view))


def _grid_one_by_one(glyphs: np.ndarray, view: int) -> np.ndarray:
    """The in-place slot targets by their definition: slot cell (r, c)'s patch (i, j) is patch (4r + i, 4c + j)."""
    g, side, gp = view // CELL, CELL // PATCH, view // PATCH
    patches = _patches_one_by_one(glyphs, view)
    out = np.zeros((g * g, side * side), np.int64)
    for r in range(g):
        for c in range(g):
            for i in range(side):
                for j in range(side):
                    out[r * g + c, i * side + j] = patches[(side * r + i) * gp + side * c + j]
    return out


def test_balanced_patch_loss_matches_its_definition_with_or_without_glyph_patches():
    """The loss reads nothing back to the host; the oracle indexes each kind of patch."""
    torch.manual_seed(0)
    logits = torch.randn(3, 40, N_CLASSES + 1, requires_grad=True)
    for targets in (torch.randint(0, 4, (3, 40)), torch.zeros(3, 40, dtype=torch.long),
                    torch.randint(1, N_CLASSES + 1, (3, 40))):
        loss, wrong = balanced_patch_loss(logits, targets)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, N_CLASSES + 1), targets.reshape(-1),
                                               reduction="none").reshape(targets.shape)
        glyph = targets > 0
        expected = sum(ce[m].mean() for m in (glyph, ~glyph) if m.any())
        assert torch.allclose(loss, expected)
        grad, = torch.autograd.grad(loss, logits)
        expected_grad, = torch.autograd.grad(expected, logits)
        assert torch.allclose(grad, expected_grad, atol=1e-7)
        named_wrong = (logits.argmax(-1) != targets)[glyph].float()
        assert float(wrong) == pytest.approx(float(named_wrong.mean()) if glyph.any() else 0.0)


def test_glyphs_round_trip_and_bad_bytes():
    glyphs = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(decode_glyphs(encode_glyphs(glyphs)), glyphs)
    assert decode_glyphs(b"").shape == (0, 4)
    with pytest.raises(ValueError, match="rows of 4"):
        decode_glyphs(np.zeros(3, np.float32).tobytes())


def test_crop_page_keeps_the_lines_characters_inside_the_crop():
    page = make_page(0, SynthConfig.from_profile("reading", seed=1), 1, "train")
    line = readable_pieces(page.lines)[0]
    cropped = crop_page(page, "line", line)
    glyphs = page_glyphs(cropped, 512)
    assert len(glyphs) == sum(not c.isspace() for c in line.text)
    assert (glyphs[:, 1] >= 0).all() and (glyphs[:, 1] <= 512).all()
    assert glyphs[:, 1].tolist() == sorted(glyphs[:, 1].tolist())  # left to right, as the line reads


def test_crop_page_of_a_block_keeps_every_line_of_it():
    page = make_page(0, SynthConfig.from_profile("reading", seed=1), 1, "train")
    paragraphs = [p for p in block_pieces(page) if "\n" not in p.text]  # a paragraph: no list markers
    assert paragraphs
    for piece in paragraphs:
        glyphs = page_glyphs(crop_page(page, "block", piece, "zoom"), 512)
        assert sorted(glyphs[:, 0].astype(int).tolist()) == sorted(char_class(c) for c in piece.text if not c.isspace())
        assert (glyphs[:, 1:] >= 0).all() and (glyphs[:, 1:] <= 512).all()
        assert len(set(np.round(glyphs[:, 2], 1).tolist())) >= 2  # on two rows or more


def _tiny_model() -> NanoDeepseekOCR:
    cfg = preset("tiny")
    cfg.slot_centering = True
    torch.manual_seed(0)
    model = NanoDeepseekOCR(cfg)
    model.init_weights()
    return model


def _page(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 512 px view with a few letters drawn big, and their glyphs."""
    from PIL import Image, ImageDraw

    from pipeline.synth import get_font

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (512, 512), "white")
    pen = ImageDraw.Draw(image)
    font = get_font("sans", 0, 40)
    rows = []
    for k in range(4):
        c = "abcdefgh"[rng.integers(8)]
        x, y = 40 + 110 * k, 60 + 100 * int(rng.integers(4))
        pen.text((x, y), c, fill="black", font=font)
        rows.append((char_class(c), x + pen.textlength(c, font=font) / 2, y, y + 40))
    return np.asarray(image).copy(), np.asarray(rows, np.float32)


@pytest.mark.parametrize("cell_target", ["bag", "grid"])
def test_glyph_heads_train_the_encoder_through_hooks(cell_target):
    model = _tiny_model()
    heads = GlyphHeads(model.config, cell_target)
    model.glyph_heads = heads
    heads.attach(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pages = [_page(s) for s in range(4)]
    images = [ImageViews.from_arrays(img, None) for img, _ in pages]
    glyphs = [g for _, g in pages]
    losses = []
    for _ in range(12):
        model.encode_images(images)
        loss, parts = heads.loss(glyphs)
        assert set(parts) == {"glyph_cell_loss", "glyph_patch_loss", "glyph_patch_error", *HEALTH} | (
            {"glyph_cell_error"} if cell_target == "grid" else set())
        loss.backward()
        assert model.sam_model.neck[0].weight.grad.abs().sum() > 0  # the signal reaches SAM
        assert model.projector.layers.weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append({k: float(v) for k, v in parts.items()})
    first, last = losses[0], losses[-1]
    assert last["glyph_patch_loss"] < 0.75 * first["glyph_patch_loss"], losses
    if cell_target == "grid":  # a bag's BCE starts at the prior already (its bias), a grid's CE far above it
        assert last["glyph_cell_loss"] < 0.85 * first["glyph_cell_loss"], losses
        assert last["glyph_cell_error"] < first["glyph_cell_error"], losses
    with torch.no_grad():  # evaluation leaves nothing behind for the next training step
        model.encode_images(images)
    model.encode_images(images[:2])
    loss, parts = heads.loss([None, None])  # images without glyphs: zero, yet every head parameter takes part
    assert float(loss.detach()) == 0.0 and set(parts) == set(HEALTH)
    loss.backward()
    assert heads.cell.weight.grad is not None
    model.encode_images(images[:2])
    with pytest.raises(RuntimeError, match="one global view per image"):
        heads.loss(glyphs[:1])
    state, head_state = split_state(model.state_dict())
    assert not any(k.startswith("glyph_heads.") for k in state) and set(head_state) == set(heads.state_dict())
    heads.detach()
    model.encode_images(images[:1])
    assert heads._neck == [] and heads._slots == []


HEALTH = ("slot_rms_mean", "slot_rms_min", "projector_input_absmax")


@pytest.mark.parametrize("centering", [False, True])
def test_slot_health_reports_what_the_decoders_first_norm_is_handed(centering):
    model = _tiny_model()
    model.config.slot_centering = centering
    heads = GlyphHeads(model.config)
    heads.attach(model)
    images = [ImageViews.from_arrays(_page(s)[0], None) for s in range(2)]
    captured = []
    hook = model.projector.register_forward_hook(lambda _m, inputs, out: captured.append((inputs[0], out)))
    model.encode_images(images)
    hook.remove()
    _, parts = heads.loss([None, None])
    features, slots = captured[0]
    slots = slots.detach().float()
    if centering:  # the GPT is handed each view's slots less their mean
        slots = slots - slots.mean(dim=1, keepdim=True)
    rms = slots.pow(2).mean(-1).sqrt()  # per slot: what rms_norm divides by
    assert float(parts["slot_rms_min"]) == pytest.approx(float(rms.min()), rel=1e-5)
    assert float(parts["slot_rms_mean"]) == pytest.approx(float(rms.mean()), rel=1e-5)
    assert float(parts["projector_input_absmax"]) == float(features.abs().max())
    assert float(parts["slot_rms_min"]) < float(parts["slot_rms_mean"])


@pytest.mark.parametrize("unit", ["tower", "block"])
def test_glyph_heads_see_the_same_features_through_compiled_towers(unit):
    """compile_vision traces the heads' hooks into the towers' graphs (or, compiled by block, runs
    them eagerly between the graphs): same loss, same gradients as eager, for any view count, and
    nothing kept under no_grad. ``aot_eager`` runs dynamo and AOTAutograd (where hooks are traced or
    lost) without inductor's code generation."""
    from torch._dynamo.utils import counters

    pages = [_page(s) for s in range(3)]
    images = [ImageViews.from_arrays(img, None) for img, _ in pages]
    glyphs = [pages[0][1], None, pages[2][1]]
    runs = []
    for compiled in (False, True):
        model = _tiny_model()
        model.glyph_heads = heads = GlyphHeads(model.config)
        heads.attach(model)
        if compiled:
            counters.clear()
            model.compile_vision(0, backend="aot_eager", unit=unit)
        steps = []
        for n in (3, 2):
            model.encode_images(images[:n])
            loss, _ = heads.loss(glyphs[:n])
            loss.backward()
            steps.append((float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()
                                                 if p.grad is not None}))
            model.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.encode_images(images[:1])
        assert heads._neck == [] and heads._slots == []
        runs.append(steps)
    assert not counters["graph_break"], dict(counters["graph_break"])
    for (eager_loss, eager_grads), (compiled_loss, compiled_grads) in zip(*runs):
        assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
        assert eager_grads.keys() == compiled_grads.keys() and any(k.startswith("sam_model.") for k in eager_grads)
        for k, g in eager_grads.items():
            torch.testing.assert_close(compiled_grads[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_glyph_cell_target_is_checked_in_the_config_and_on_resume(tmp_path):
    """A misspelt target fails when the config is built; resuming heads trained for the other target
    says which one they were trained for instead of a state-dict size mismatch."""
    from safetensors.torch import save_file

    from pipeline.glyph_loss import STATE_FILE
    from pipeline.train import _with_glyph_heads, load_train_config

    stream = dict(profile="reading", pages=8, mode="tiny")
    with pytest.raises(ValueError, match="glyph_cell must be one of bag, grid"):
        load_train_config(None, stage=1, preset="tiny", synth=stream, glyph_loss=1.0, glyph_cell="grids")
    model = _tiny_model()
    save_file(GlyphHeads(model.config, "bag").state_dict(), str(tmp_path / STATE_FILE))
    grid = load_train_config(None, stage=1, preset="tiny", synth=stream, glyph_loss=1.0, glyph_cell="grid")
    with pytest.raises(ValueError, match="another glyph_cell target than 'grid'"):
        _with_glyph_heads(grid, model, str(tmp_path))
    bag = load_train_config(None, stage=1, preset="tiny", synth=stream, glyph_loss=1.0)
    heads = _with_glyph_heads(bag, _tiny_model(), str(tmp_path)).glyph_heads
    assert heads.cell_target == "bag" and heads.cell.weight.shape == (N_CLASSES, model.config.gpt.n_embd)
    fresh = _with_glyph_heads(grid, _tiny_model(), None).glyph_heads
    assert fresh.cell.weight.shape == (16 * (N_CLASSES + 1), model.config.gpt.n_embd)
