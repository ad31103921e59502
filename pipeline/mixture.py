"""Task mixtures and packing of token rows into fixed-length training sequences.

Packing keeps each sample intact and self-contained: positions restart at 0 and a segment id
per sample limits attention to the sample itself (see ``model.gpt``), so a packed sample
trains exactly what the model sees at inference, while the sequence stays full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from model.vlm import ImageViews


@dataclass
class Sample:
    """One tokenised record: ids, loss mask and the images whose slots the ids contain."""

    input_ids: np.ndarray  # int
    loss_mask: np.ndarray  # 0/1, 1 where the token is a training target
    images: list[ImageViews] = field(default_factory=list)
    task: str = ""
    glyphs: np.ndarray | None = None  # [n, 4] of its one image's global view (pipeline.glyphs), when known

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedBatch:
    """[B, T] tensors for ``NanoDeepseekOCR.forward`` and the images in row-major slot order."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    segment_ids: torch.Tensor
    images: list[ImageViews]
    n_samples: int
    n_target_tokens: int
    glyphs: list[np.ndarray | None] = field(default_factory=list)  # per image (pipeline.glyphs), stays on the host

    def to(self, device: torch.device | str, index_on_host: bool = False) -> "PackedBatch":
        """The batch on ``device``; ``index_on_host`` keeps ids, positions and segment ids where they
        are: the model reads slot counts and segment boundaries from them there, without a device
        sync, and moves them itself (``NanoDeepseekOCR.forward``)."""
        move = (lambda t: t) if index_on_host else (lambda t: t.to(device, non_blocking=True))  # noqa: E731
        return PackedBatch(move(self.input_ids), self.targets.to(device, non_blocking=True), move(self.positions),
                           move(self.segment_ids), [im.to(device) for im in self.images], self.n_samples,
                           self.n_target_tokens, self.glyphs)

    def pin_memory(self) -> "PackedBatch":
        """Page-locked copies (a background thread prepares them; see ``pipeline.prefetch``)."""
        return PackedBatch(self.input_ids.pin_memory(), self.targets.pin_memory(), self.positions.pin_memory(),
                           self.segment_ids.pin_memory(), [im.pin_memory() for im in self.images], self.n_samples,
                           self.n_target_tokens, self.glyphs)


def sample_targets(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Next-token targets: ``ids[t+1]`` where ``mask[t+1]`` is set, else -1; the last is -1."""
    targets = np.full(len(input_ids), -1, dtype=np.int64)
    nxt = np.asarray(input_ids[1:], dtype=np.int64)
    targets[:-1] = np.where(np.asarray(loss_mask[1:]) > 0, nxt, -1)
    return targets


def view_pixels(sample: Sample) -> int:
    """Pixels of every view (global + tiles) a sample carries: what its vision work scales with."""
    return sum(im.global_view[0].numel() + (im.tiles[:, 0].numel() if im.tiles.shape[0] else 0)
               for im in sample.images)


def pack_sequences(samples: Iterable[Sample], seq_len: int, max_pixels: int | None = None,
                   lookahead: int = 1) -> Iterator[list[Sample]]:
    """Groups of samples whose total length fits ``seq_len`` (and whose views fit ``max_pixels``).

    Why a pixel cap: a packed row's GPT work is fixed by ``seq_len``, but its vision work grows
    with the views of the pages that happen to land in it (one, two or three Gundam pages in
    4096 tokens). Data-parallel steps wait for the slowest worker, so rows of unequal vision
    work cost the difference on every step; capping the pixels per row makes the rows even.
    A sample larger than the cap still gets a row of its own.

    ``lookahead`` samples that did not fit wait for the next rows, which are first filled from
    them in arrival order (first fit); 1 is plain greedy packing in arrival order. A waiting
    sample is never overtaken for long: the oldest one always opens the next row.
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")

    def fits(s: Sample, used: int, pixels: int) -> bool:
        if used == 0:  # an empty row takes anything
            return True
        return used + len(s) <= seq_len and (max_pixels is None or pixels + view_pixels(s) <= max_pixels)

    source = iter(samples)
    waiting: list[Sample] = []
    exhausted = False
    while True:
        group: list[Sample] = []
        used = pixels = 0
        kept: list[Sample] = []
        for s in waiting:
            if fits(s, used, pixels):
                group.append(s)
                used, pixels = used + len(s), pixels + view_pixels(s)
            else:
                kept.append(s)
        waiting = kept
        while not exhausted and len(waiting) < lookahead and used < seq_len:
            s = next(source, None)
            if s is None:
                exhausted = True
            elif len(s) > seq_len:
                raise ValueError(f"a sample of {len(s)} tokens does not fit seq_len {seq_len} "
                                 "(preprocess with --max-seq-len <= the training seq_len)")
            elif fits(s, used, pixels):
                group.append(s)
                used, pixels = used + len(s), pixels + view_pixels(s)
            else:
                waiting.append(s)
        if not group:
            return
        yield group


def collate(groups: Sequence[list[Sample]], seq_len: int) -> PackedBatch:
    """Lay packed groups out as rows of one batch (padding: id 0, target -1, own segment)."""
    B = len(groups)
    ids = torch.zeros(B, seq_len, dtype=torch.long)
    targets = torch.full((B, seq_len), -1, dtype=torch.long)
    positions = torch.zeros(B, seq_len, dtype=torch.long)
    segments = torch.full((B, seq_len), -1, dtype=torch.long)
    images: list[ImageViews] = []
    glyphs: list[np.ndarray | None] = []
    n_samples = 0
    for b, group in enumerate(groups):
        start = 0
        for seg, s in enumerate(group):
            n = len(s)
            ids[b, start:start + n] = torch.as_tensor(np.asarray(s.input_ids, dtype=np.int64))
            targets[b, start:start + n] = torch.as_tensor(sample_targets(s.input_ids, s.loss_mask))
            positions[b, start:start + n] = torch.arange(n)
            segments[b, start:start + n] = seg
            images.extend(s.images)
            glyphs.extend([s.glyphs] if len(s.images) == 1 else [None] * len(s.images))
            start += n
            n_samples += 1
    return PackedBatch(ids, targets, positions, segments, images, n_samples, int((targets >= 0).sum()), glyphs)


def batches(samples: Iterable[Sample], seq_len: int, batch_size: int, max_pixels: int | None = None,
            lookahead: int = 1) -> Iterator[PackedBatch]:
    """Packed batches of ``batch_size`` rows each (the last one may be smaller); see
    :func:`pack_sequences` for ``max_pixels`` and ``lookahead``."""
    rows: list[list[Sample]] = []
    for group in pack_sequences(samples, seq_len, max_pixels, lookahead):
        rows.append(group)
        if len(rows) == batch_size:
            yield collate(rows, seq_len)
            rows = []
    if rows:
        yield collate(rows, seq_len)


def mixture_counts(n_vision: int, n_text: int, text_ratio: float) -> tuple[int, int]:
    """How many vision and text rows make a ``text_ratio`` mixture using all vision rows.

    Text rows repeat when there are too few; with no vision rows the text rows are used as is.
    """
    if not 0 <= text_ratio < 1:
        raise ValueError(f"text_ratio must be in [0, 1), got {text_ratio}")
    if n_text == 0 or text_ratio == 0:
        return n_vision, 0
    if n_vision == 0:
        return 0, n_text
    return n_vision, max(1, round(n_vision * text_ratio / (1 - text_ratio)))
