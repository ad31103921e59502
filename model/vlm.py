"""NanoDeepseekOCR: DeepEncoder (SAM -> compressor -> CLIP) + linear projector + GPT.

The vision half turns each view into grid features, the projector maps
``[CLIP out ; SAM flat]`` (2048-d at full size) to the GPT width, and the features are laid
out in DeepSeek-OCR's order: the stitched local tiles with a newline embedding after each
row, then the global view with a newline after each row, then the view separator. Those
embeddings replace the ``<image>`` slots of the prompt in order.

Submodule names follow the released checkpoint (``sam_model``, ``vision_model``,
``projector.layers``, ``image_newline``, ``view_seperator`` [sic]) so DeepSeek-OCR's vision
weights import by stripping the ``model.`` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.clip import CLIPEncoder
from model.config import VLMConfig
from model.gpt import GPT
from model.sam import SAMEncoder


def _channels_first(array: np.ndarray | torch.Tensor, axes: tuple[int, ...]) -> np.ndarray:
    """A new, writable C-order copy of ``array`` with its axes in ``axes`` order."""
    array = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    return np.array(array.transpose(axes), order="C", copy=True)


@dataclass
class ImageViews:
    """The uint8 views of one image, as the processor cut them (normalised on the device)."""

    global_view: torch.Tensor  # uint8 [3, S, S]
    tiles: torch.Tensor  # uint8 [N, 3, t, t] (N may be 0)
    spatial_crop: tuple[int, int] = (1, 1)  # (cols, rows)

    @classmethod
    def from_arrays(cls, global_view: np.ndarray | torch.Tensor, tiles: np.ndarray | torch.Tensor | None,
                    spatial_crop: Sequence[int] = (1, 1)) -> "ImageViews":
        """From HWC / NHWC uint8 arrays (the processor's and the shards' layout), as new CHW tensors.

        The channel move is numpy's copy: torch's uint8 ``permute(...).contiguous()`` took 5.3 ms for
        a 1024 px view against numpy's 1.0 ms (one thread, as Ray's GPU workers run), and a tier-2
        training step moves ~50 of them on the trainer's data thread.
        """
        g = torch.from_numpy(_channels_first(global_view, (2, 0, 1)))
        if tiles is None or len(tiles) == 0:
            t = torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
        else:
            t = torch.from_numpy(_channels_first(tiles, (0, 3, 1, 2)))
        cols, rows = (int(v) for v in spatial_crop)
        if t.shape[0] and t.shape[0] != cols * rows:
            raise ValueError(f"{t.shape[0]} tiles do not fill a {cols}x{rows} grid")
        return cls(g, t, (cols, rows))

    @classmethod
    def from_processed(cls, processed) -> "ImageViews":
        return cls.from_arrays(processed.global_view, processed.tiles, processed.spatial_crop)

    def to(self, device: torch.device | str) -> "ImageViews":
        return ImageViews(self.global_view.to(device, non_blocking=True),
                          self.tiles.to(device, non_blocking=True), self.spatial_crop)

    def pin_memory(self) -> "ImageViews":
        """Page-locked copies, so that ``to(cuda)`` runs asynchronously."""
        return ImageViews(self.global_view.pin_memory(), self.tiles.pin_memory(), self.spatial_crop)


def _views_dynamic_only():
    """While the compiled towers trace: only dimensions marked dynamic (the view count) are;
    a new view size compiles a new static graph instead of making height and width symbolic."""
    from torch import _dynamo

    return _dynamo.config.patch(automatic_dynamic_shapes=False)


VISION_COMPILE_UNITS = ("tower", "block")  # what compile_vision compiles as one graph


def _views_first_dynamic(compiled, model: "NanoDeepseekOCR"):
    """A compiled block's forward whose input's first dimension (views, or views x windows) is
    marked dynamic while the model trains with a dynamic view count (``compile_vision(0)``): the
    block sees activations, not the views that the tower call marks."""
    from torch import _dynamo

    def forward(x: torch.Tensor) -> torch.Tensor:
        if model.dynamic_views:
            _dynamo.maybe_mark_dynamic(x, 0)
        return compiled(x)

    return forward


def normalize(views_u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> float with mean = std = 0.5 (DeepSeek-OCR's normalisation)."""
    return views_u8.to(dtype).div(127.5).sub(1.0)


def slot_count(global_grid: int, tile_grid: int = 0, crop: Sequence[int] = (1, 1), n_tiles: int = 0) -> int:
    """Vision slots of one image: g*(g+1)+1, plus (q*rows)*(q*cols+1) when tiled."""
    n = global_grid * (global_grid + 1) + 1
    if n_tiles:
        cols, rows = crop
        n += (tile_grid * rows) * (tile_grid * cols + 1)
    return n


def center_slots(features: torch.Tensor) -> torch.Tensor:
    """[N, slots, D] with each view's mean slot subtracted (see ``VLMConfig.slot_centering``)."""
    return features - features.mean(dim=1, keepdim=True)


def global_view_slots(embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """[grid * grid, D]: the global view's slots, row-major without the newline column, of one
    image's embeddings as :meth:`NanoDeepseekOCR.encode_images` lays them out (tiles, then the
    global rows each ending in a newline, then the separator): what a per-cell head reads."""
    rows = embeddings[-(grid * (grid + 1) + 1):-1]
    return rows.reshape(grid, grid + 1, -1)[:, :grid].reshape(grid * grid, -1)


class Projector(nn.Module):
    """Linear map from [CLIP ; SAM] features to the GPT width (checkpoint key ``projector.layers``).

    ``input_split`` (CLIP's width) turns on :attr:`VLMConfig.projector_input_norm`: each of the two
    inputs is layer-normalised on its own channels first (no weights, so the checkpoint keys stay).
    """

    def __init__(self, in_dim: int, out_dim: int, input_split: int | None = None) -> None:
        super().__init__()
        if input_split is not None and not 0 < input_split < in_dim:
            raise ValueError(f"input_split must be inside (0, {in_dim}), got {input_split}")
        self.layers = nn.Linear(in_dim, out_dim)
        self.input_split = input_split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_split is not None:
            c = self.input_split
            x = torch.cat([F.layer_norm(x[..., :c], (c,)), F.layer_norm(x[..., c:], (x.shape[-1] - c,))], dim=-1)
        return self.layers(x)


class NanoDeepseekOCR(nn.Module):
    """The whole vision-language model. ``forward(input_ids, images, targets)`` trains it."""

    def __init__(self, config: VLMConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.sam_model = SAMEncoder(config.sam)
        self.vision_model = CLIPEncoder(config.clip)
        self.projector = Projector(config.projector_in, config.gpt.n_embd,
                                   config.clip.hidden_size if config.projector_input_norm else None)
        std = config.gpt.n_embd ** -0.5
        self.image_newline = nn.Parameter(torch.randn(config.gpt.n_embd) * std)
        self.view_seperator = nn.Parameter(torch.randn(config.gpt.n_embd) * std)
        self.gpt = GPT(config.gpt)
        self.view_chunk = 0  # > 0: views go through the towers in chunks of exactly this many (see compile_vision)
        self.dynamic_views = False  # compiled towers with the view count as a dynamic dimension

    # ----------------------------------------------------------------- setup
    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT with nanochat's init; vision parts keep their module defaults."""
        self.gpt.init_weights()
        std = self.config.gpt.n_embd ** -0.5
        self.image_newline.normal_(0.0, std)
        self.view_seperator.normal_(0.0, std)

    def freeze_stage2(self) -> list[str]:
        """Stage 2: freeze SAM + neck + compressor (net_2, net_3); returns the frozen names."""
        frozen = []
        for name, p in self.sam_model.named_parameters():
            p.requires_grad_(False)
            frozen.append(f"sam_model.{name}")
        return frozen

    def component_params(self) -> dict[str, int]:
        """Parameter count per component (works on the meta device)."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "sam+compressor": count(self.sam_model),
            "clip": count(self.vision_model),
            "projector": count(self.projector),
            "newline+separator": self.image_newline.numel() + self.view_seperator.numel(),
            "gpt": count(self.gpt),
        }

    def compile_vision(self, chunk: int = 8, backend: str = "inductor", unit: str = "tower") -> None:
        """``torch.compile`` SAM and CLIP (about 2x faster on an H100).

        A compiled graph is specialised to its input shape, and the number of views in a call
        varies (pages, tiles per page). ``chunk > 0`` (inference): views are fed in chunks of
        exactly ``chunk``, the last one padded with blank views, so each view size compiles once
        with fully static shapes. ``chunk == 0`` (training, where a step's views go through in
        one call per view size and backward must see them together): the view count is a
        dynamic dimension instead, so each view size compiles once for any count. Views are
        encoded independently, so neither changes a result.

        ``unit``: ``"tower"`` compiles each tower whole; forward hooks registered on the towers'
        submodules before this call are traced into the graphs (the glyph heads use that).
        ``"block"`` compiles each transformer block of SAM and CLIP on its own and leaves the
        convolutions, neck and norms between them eager: blocks of one kind share a graph, so
        there is far less to compile (the small preset's first training step on CPU: 19 s against
        71 s compiled whole, 11 s eager; ``bench/glyph_step.py --variants eager,compiled_gpt,blocks_gpt``),
        at the cost of the fusions across a block's edges.
        """
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {chunk}")
        if unit not in VISION_COMPILE_UNITS:
            raise ValueError(f"unit must be one of {VISION_COMPILE_UNITS}, got {unit!r}")
        self.view_chunk = chunk
        self.dynamic_views = chunk == 0
        modules = ((self.sam_model, self.vision_model) if unit == "tower"
                   else (*self.sam_model.blocks, *self.vision_model.transformer.layers))
        for module in modules:
            if getattr(module.forward, "_nano_compiled", False):
                continue
            compiled = torch.compile(module.forward, dynamic=None if chunk == 0 else False, backend=backend)
            if unit == "block":
                compiled = _views_first_dynamic(compiled, self)
            compiled._nano_compiled = True
            module.forward = compiled

    # ---------------------------------------------------------------- vision
    def _encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] normalised -> [N, h*w, n_embd] projected grid features (row-major)."""
        n = self.view_chunk
        if n < 1 or views.shape[0] == n:
            return self._encode_view_batch(views)
        out = []
        for i in range(0, views.shape[0], n):
            chunk = views[i:i + n]
            k = chunk.shape[0]
            if k < n:
                chunk = torch.cat([chunk, chunk.new_zeros((n - k, *chunk.shape[1:]))])
            out.append(self._encode_view_batch(chunk)[:k])
        return torch.cat(out)

    def _encode_view_batch(self, views: torch.Tensor) -> torch.Tensor:
        if self.dynamic_views:
            from torch import _dynamo

            with _views_dynamic_only():
                _dynamo.maybe_mark_dynamic(views, 0)
                sam_features = self.sam_model(views)  # [N, C, h, w]
                _dynamo.maybe_mark_dynamic(sam_features, 0)
                clip_out = self.vision_model(None, sam_features)  # [N, 1 + h*w, C]
        else:
            sam_features = self.sam_model(views)
            clip_out = self.vision_model(None, sam_features)
        features = torch.cat([clip_out[:, 1:], sam_features.flatten(2).transpose(1, 2)], dim=-1)
        projected = self.projector(features)
        return center_slots(projected) if self.config.slot_centering else projected

    def encode_images(self, images: Sequence[ImageViews]) -> list[torch.Tensor]:
        """Vision embeddings per image, [n_slots, n_embd] each, in DeepSeek-OCR's slot order.

        Views of equal size across the batch are encoded in one call (globals together,
        tiles together), which is where batching pays off on a GPU. The global views' rows,
        newlines and separators are laid out for a whole size group at once: a training step
        holds a hundred line crops or more, and per-image work there is host time the GPU waits on.
        """
        if not images:
            return []
        device = self.image_newline.device
        dtype = self.projector.layers.weight.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        groups: dict[tuple[int, int], list[tuple[int, str, torch.Tensor]]] = {}
        for i, im in enumerate(images):
            if im.global_view.dim() != 3 or im.global_view.shape[0] != 3:
                raise ValueError(f"image {i}: global view must be uint8 [3, S, S], got {tuple(im.global_view.shape)}")
            groups.setdefault(tuple(im.global_view.shape[-2:]), []).append((i, "global", im.global_view))
            if im.tiles.shape[0]:
                groups.setdefault(tuple(im.tiles.shape[-2:]), []).append((i, "tiles", im.tiles))
        globals_: dict[int, torch.Tensor] = {}  # image -> its global rows + separator
        tiles: dict[int, torch.Tensor] = {}  # image -> its tiles' features
        for members in groups.values():
            batch = torch.cat([t[None] if kind == "global" else t for _, kind, t in members])
            feats = self._encode_views(normalize(batch.to(device), dtype))
            rows, owners, start = [], [], 0
            for i, kind, t in members:
                n = 1 if kind == "global" else t.shape[0]
                if kind == "tiles":
                    tiles[i] = feats[start:start + n]
                else:
                    rows.append(start)
                    owners.append(i)
                start += n
            if owners:
                own = feats if len(rows) == feats.shape[0] else feats[torch.tensor(rows, device=feats.device)]
                globals_.update(zip(owners, self._arrange_globals(own).unbind(0)))
        out = []
        for i, im in enumerate(images):
            if i in tiles:
                cols, rows_ = im.spatial_crop
                out.append(torch.cat([self._arrange_tiles(tiles[i], cols, rows_), globals_[i]]))
            else:
                out.append(globals_[i])
        return out

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[..., h, w, D] -> [..., h * (w + 1), D]: each grid row closed by the newline embedding."""
        *lead, h, w, d = grid.shape
        newline = self.image_newline.to(grid.dtype).expand(*lead, h, 1, d)
        return torch.cat([grid, newline], dim=-2).reshape(*lead, h * (w + 1), d)

    def _arrange_globals(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, g*g, D] global-view features -> [N, g*(g+1) + 1, D]: rows with newlines, then the separator."""
        n, hw, d = feats.shape
        g = int(round(hw ** 0.5))
        if g * g != hw:
            raise ValueError(f"view features of {hw} positions are not a square grid")
        separator = self.view_seperator.to(feats.dtype).expand(n, 1, d)
        return torch.cat([self._with_newlines(feats.view(n, g, g, d)), separator], dim=1)

    def _arrange_tiles(self, feats: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
        n, hw, d = feats.shape
        q = int(round(hw ** 0.5))
        stitched = feats.view(rows, cols, q, q, d).permute(0, 2, 1, 3, 4).reshape(rows * q, cols * q, d)
        return self._with_newlines(stitched)

    # ------------------------------------------------------------- language
    def merge_embeddings(self, input_ids: torch.Tensor, vision: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """Token embeddings with the ``<image>`` slots filled by vision embeddings, in order.

        ``input_ids`` may stay on the host (the trainer passes them so): the slots are counted
        there without waiting for the device, and the ids move over asynchronously.
        """
        n_slots = int((input_ids == self.config.image_token_id).sum())
        n_vision = sum(v.shape[0] for v in vision) if vision else 0
        if n_slots != n_vision:
            raise ValueError(
                f"the prompt has {n_slots} <image> slots but the images give {n_vision} embeddings "
                "(mode or tokenizer mismatch between processor and prompt?)")
        input_ids = input_ids.to(self.image_newline.device, non_blocking=True)
        embeds = self.gpt.embed(input_ids)
        if n_slots:
            flat = torch.cat(list(vision)).to(embeds.dtype)
            embeds = embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], flat)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Sequence[ImageViews] | None = None,
        targets: torch.Tensor | None = None,
        *,
        vision_embeds: Sequence[torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits, or the loss when ``targets`` are given (-1 = no loss).

        ``images`` are the images whose slots appear in ``input_ids`` in row-major order;
        pass ``vision_embeds`` instead when they were encoded elsewhere (Serve's encoder).
        """
        if vision_embeds is None:
            vision_embeds = self.encode_images(images or [])
        embeds = self.merge_embeddings(input_ids, vision_embeds)
        return self.gpt(targets=targets, inputs_embeds=embeds, positions=positions,
                        segment_ids=segment_ids, loss_reduction=loss_reduction)
