"""Training-step metrics that cost no host sync on the steps that do not report them.

Reading a loss (``float(loss)``) makes the host wait until the GPU has finished the step; the GPU
then idles while the host launches the next step's first kernels. The trainer keeps a step's values
(loss, grad norm, the glyph heads' losses) on the device, and :class:`StepMeter` turns them into
floats only on the steps that report them (``log_every``, checkpoints, the end), measuring
throughput over the window of steps since the last report.
"""

from __future__ import annotations

import time

import torch

from pipeline.distributed import to_float


class StepMeter:
    """Counts a window of steps on the host; :meth:`read` reports and starts the next window."""

    def __init__(self, world: int = 1) -> None:
        self.world = world
        self._start()

    def _start(self) -> None:
        self._t0 = time.perf_counter()
        self._tokens = self._samples = self._steps = 0
        self._data_wait_s = self._flops = 0.0

    def add(self, tokens: int, samples: int, data_wait_s: float, flops: float = 0.0) -> None:
        """One finished step's host-side counts (this rank's tokens, samples and training FLOPs)."""
        self._flops += flops
        self._tokens += tokens
        self._samples += samples
        self._data_wait_s += data_wait_s
        self._steps += 1

    def read(self, values: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """``values`` as floats (the one wait for the device), with ``tokens_per_s`` and
        ``samples_per_s`` over the window (this rank's counts x world: summing the ranks' would
        sync them), ``flops_per_s`` likewise (when steps counted their FLOPs) and ``data_wait_s``,
        the mean wait for data per step of the window."""
        out = {k: to_float(v) for k, v in values.items()}
        elapsed = max(time.perf_counter() - self._t0, 1e-9)  # after the read: the device has caught up
        out["tokens_per_s"] = self._tokens * self.world / elapsed
        out["samples_per_s"] = self._samples * self.world / elapsed
        if self._flops:
            out["flops_per_s"] = self._flops * self.world / elapsed
        out["data_wait_s"] = self._data_wait_s / max(1, self._steps)
        self._start()
        return out
