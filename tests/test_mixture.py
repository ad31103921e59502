"""Packing rows: greedy by tokens, or balanced by the pixels of their views (even vision work per rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.vlm import ImageViews
from pipeline.mixture import Sample, batches, pack_sequences, view_pixels


def _page(n_tokens: int, tiles: int = 0, side: int = 64, tile: int = 32, tag: int = 0) -> Sample:
    """A sample of ``n_tokens`` ids (all ``tag``) with one image of ``tiles`` tiles, or none if ``side`` is 0."""
    images = []
    if side:
        g = np.zeros((side, side, 3), np.uint8)
        t = np.zeros((tiles, tile, tile, 3), np.uint8) if tiles else None
        images.append(ImageViews.from_arrays(g, t, (tiles, 1) if tiles else (1, 1)))
    return Sample(np.full(n_tokens, tag), np.ones(n_tokens, np.int64), images)


def _reference_greedy(samples: list[Sample], seq_len: int) -> list[list[Sample]]:
    """Arrival-order greedy packing, written out plainly."""
    rows, row, used = [], [], 0
    for s in samples:
        if used + len(s) > seq_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(s)
        used += len(s)
    return rows + ([row] if row else [])


def test_view_pixels_counts_the_global_view_and_every_tile():
    assert view_pixels(_page(5, tiles=3, side=64, tile=32)) == 64 * 64 + 3 * 32 * 32
    assert view_pixels(_page(5, side=0)) == 0


def test_lookahead_one_is_greedy_packing_in_arrival_order():
    rng = np.random.default_rng(0)
    samples = [_page(int(n), tag=i) for i, n in enumerate(rng.integers(1, 40, size=200))]
    got = list(pack_sequences(samples, 64))
    want = _reference_greedy(samples, 64)
    assert [[id(s) for s in row] for row in got] == [[id(s) for s in row] for row in want]


def test_pixel_cap_evens_out_the_views_per_row_and_loses_nothing():
    rng = np.random.default_rng(1)
    # pages of 40-120 tokens with 6 tiles each: greedy rows of 256 tokens hold 2, 3 or 4 of them,
    # as a 4096-token row holds one to three Gundam pages
    samples = [_page(int(n), tiles=6, tag=i) for i, n in enumerate(rng.integers(40, 121, size=300))]
    cap = 2 * view_pixels(samples[0])
    greedy = list(pack_sequences(samples, 256))
    balanced = list(pack_sequences(samples, 256, max_pixels=cap, lookahead=16))
    row_pixels = lambda rows: np.array([sum(view_pixels(s) for s in row) for row in rows[:-3]])  # noqa: E731
    assert row_pixels(greedy).max() >= 3 * view_pixels(samples[0])  # the slow rows balancing removes
    assert (row_pixels(balanced) == cap).all()  # every row (but the tail) has the same vision work
    assert all(sum(len(s) for s in row) <= 256 for row in balanced)
    packed = sorted(id(s) for row in balanced for s in row)
    assert packed == sorted(id(s) for s in samples)  # every sample exactly once


def test_lookahead_fills_rows_from_waiting_samples_and_the_oldest_opens_the_next_row():
    long, short = _page(50, tag=1), _page(10, tag=2)
    a, b = _page(30, tag=3), _page(30, tag=4)
    rows = list(pack_sequences([a, long, short, b], 64, lookahead=4))
    # `long` does not fit after `a`; `short` does (first fit), then `long` opens the next row
    assert [[int(s.input_ids[0]) for s in row] for row in rows] == [[3, 2], [1], [4]]


def test_a_sample_over_the_pixel_cap_gets_a_row_of_its_own():
    big, small = _page(10, tiles=6), _page(10, tiles=0)
    rows = list(pack_sequences([small, big, small], 64, max_pixels=view_pixels(small) * 2, lookahead=2))
    assert [len(r) for r in rows] == [2, 1] and rows[1][0] is big


def test_bad_lookahead_and_overlong_samples_are_rejected():
    with pytest.raises(ValueError, match="lookahead"):
        list(pack_sequences([_page(5)], 64, lookahead=0))
    with pytest.raises(ValueError, match="does not fit seq_len"):
        list(pack_sequences([_page(100)], 64, lookahead=3))


def test_balanced_batches_collate_rows_with_their_images_in_slot_order():
    samples = [_page(20, tiles=2, tag=i) for i in range(6)]
    batch = next(batches(samples, 64, batch_size=2, max_pixels=2 * view_pixels(samples[0]), lookahead=4))
    assert batch.input_ids.shape == (2, 64) and len(batch.images) == 4 and batch.n_samples == 4
    assert torch.equal(batch.input_ids[0, :20], torch.zeros(20, dtype=torch.long))


def test_views_from_shard_bytes_are_channels_first_copies():
    """ImageViews.from_arrays on the read-only views a shard row decodes to (decode_row(copy=False), the
    trainer's path): CHW / NCHW tensors with the same pixels, contiguous and writable, sharing no memory."""
    from pipeline.preprocess import decode_row, shard_row

    rng = np.random.default_rng(0)
    view = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    tiles = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    row = shard_row("r", "free", [1], [1], mode="tiny", global_view=view, tiles=tiles, spatial_crop=[2, 1],
                    n_image_tokens=4)
    decoded = decode_row(row, copy=False)
    assert not decoded["global_view"].flags.writeable  # a view of the row's bytes
    assert decode_row(row)["global_view"].flags.writeable  # the default still copies
    views = ImageViews.from_arrays(decoded["global_view"], decoded["tiles"], decoded["spatial_crop"])
    assert torch.equal(views.global_view, torch.from_numpy(view).permute(2, 0, 1))
    assert torch.equal(views.tiles, torch.from_numpy(tiles).permute(0, 3, 1, 2))
    assert views.global_view.is_contiguous() and views.tiles.is_contiguous() and views.spatial_crop == (2, 1)
    views.global_view.zero_()  # writable, and the row's bytes are untouched
    assert np.array_equal(decode_row(row)["global_view"], view)
    from_tensor = ImageViews.from_arrays(torch.from_numpy(view), None)
    assert torch.equal(from_tensor.global_view, torch.from_numpy(view).permute(2, 0, 1))
    assert from_tensor.tiles.shape == (0, 3, 1, 1)
