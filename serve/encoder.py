"""``VisionEncoder``: image views -> vision embeddings, batching concurrent images.

Each call carries one image; ``@serve.batch`` gathers the calls that arrive within
``batch_wait_timeout_s`` (up to ``max_batch_size``) into one forward, where views of equal
size are encoded together. The sizes of the batches it ran are recorded so that batching can
be observed (``get_stats``, ``GET /v1/stats``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import numpy as np
import ray
import torch
from ray import serve

from model.vlm import ImageViews
from serve.checkpoints import load_part, resolve_device, resolve_dtype

log = logging.getLogger("ray.serve")
STATS_WINDOW = 10_000  # batch sizes kept for get_stats


def _writable(array: np.ndarray) -> np.ndarray:
    """Arrays from Ray's object store are read-only views; torch wants to own writable memory."""
    return array if array.flags.writeable else array.copy()


@serve.deployment(name="VisionEncoder")
class VisionEncoder:
    """Returns ``{"embeds": Tensor[n_slots, n_embd] on CPU, "encode_ms", "batch_size"}`` per image."""

    def __init__(self, checkpoint: str, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 batch_wait_timeout_s: float = 0.02, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model, _, _ = load_part(checkpoint, "vision", self.device, self.dtype)
        self._encode_batch.set_max_batch_size(int(max_batch_size))
        self._encode_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=STATS_WINDOW)
        self.images = 0
        log.info("VisionEncoder ready: %s on %s/%s, batches of <= %d", checkpoint, self.device, self.dtype,
                 max_batch_size)

    def _forward(self, images: list[dict]) -> list[torch.Tensor]:
        views = [ImageViews.from_arrays(_writable(im["global_view"]), _writable(im["tiles"]), im["crop"])
                 for im in images]
        with torch.inference_mode():
            out = self.model.encode_images(views)
            return [e.to("cpu") for e in out]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _encode_batch(self, images: list[dict]) -> list[dict]:
        self.batch_sizes.append(len(images))
        self.images += len(images)
        start = time.perf_counter()
        embeds = await asyncio.to_thread(self._forward, images)  # keep the replica's loop free to gather
        ms = (time.perf_counter() - start) * 1000
        return [{"embeds": e, "encode_ms": ms, "batch_size": len(images)} for e in embeds]

    async def encode(self, image: dict) -> dict:
        """One image's views (uint8 ``global_view`` HWC, ``tiles`` NHWC, ``crop`` (cols, rows))."""
        return await self._encode_batch(image)

    def get_stats(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"replica": ray.get_runtime_context().get_actor_name(), "images": self.images,
                "batches": len(sizes), "batch_sizes": sizes, "max_batch_size": max(sizes, default=0)}
