"""Skip the optimizer step whose gradient norm spikes far above its recent level.

Why: tier-2 runs from random init (``bench/RESULTS.md``, sessions 16-17) see pre-clip gradient
norms of 1e7-1e11 against a usual 5-50, from the vision side only (``grad_norm_<part>``). Clipping
keeps the step's size, but not its direction: the clipped gradient is that one spike, every other
part's gradient is scaled to ~0 for the step, and AdamW's second moments of the spiking weights
jump and hold their learning rate down for the next hundred steps. Skipping the step leaves
weights and optimizer states as they were, as large-model trainers do with loss spikes.

The decision stays on the device (no host sync in the train loop): the reference is a running
mean of the accepted steps' norms, kept as a tensor, and the optimizer reads the skip flag as a
tensor (``pipeline.optim.CombinedOptimizer.step``).

A guard that skips every step has stopped the run without saying so (session 18's run skipped
all of its last 400 steps): :meth:`SpikeGuard.raise_if_stuck` turns a long run of skips into an
error, checked where the loop reads its metrics anyway.
"""

from __future__ import annotations

import torch


class TrainingDiverged(RuntimeError):
    """Every one of the last ``patience`` steps was skipped: the weights no longer move."""


class SpikeGuard:
    """Flags a step whose gradient norm is not finite or above ``factor`` x the running reference.

    The first finite norm starts the reference; each accepted step moves it by ``1 - decay``
    towards its norm. A skipped step leaves the reference alone, so a run of spikes cannot
    raise the bar for the next ones.
    """

    def __init__(self, factor: float, decay: float = 0.98) -> None:
        if factor <= 1.0:
            raise ValueError(f"skip_spikes must be > 1 (a multiple of the running grad norm), got {factor}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the reference's decay must be in [0, 1), got {decay}")
        self.factor = factor
        self.decay = decay
        self.reference: torch.Tensor | None = None  # running mean of accepted norms (device)
        self.seen: torch.Tensor | None = None  # whether a step was accepted yet (device bool)
        self.skipped: torch.Tensor | None = None  # steps skipped so far (device)
        self.in_a_row: torch.Tensor | None = None  # steps skipped since the last accepted one (device)

    def check(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """A 0-dim float32 tensor on ``grad_norm``'s device: 1.0 where this step is to be skipped."""
        norm = grad_norm.detach().float().reshape(())
        if self.reference is None:
            self.reference = torch.zeros_like(norm)
            self.seen = torch.zeros((), dtype=torch.bool, device=norm.device)
            self.skipped = torch.zeros_like(norm)
            self.in_a_row = torch.zeros_like(norm)
        skip = ~torch.isfinite(norm) | (self.seen & (norm > self.factor * self.reference))
        moved = torch.where(self.seen, self.decay * self.reference + (1 - self.decay) * norm, norm)
        self.reference = torch.where(skip, self.reference, moved)
        self.seen = self.seen | ~skip
        self.skipped = self.skipped + skip.float()
        self.in_a_row = torch.where(skip, self.in_a_row + 1, torch.zeros_like(self.in_a_row))
        return skip.float()

    def raise_if_stuck(self, patience: int, step: int) -> None:
        """Raise :class:`TrainingDiverged` when the last ``patience`` steps were all skipped (a host read)."""
        if self.in_a_row is None:
            return
        in_a_row = int(self.in_a_row)
        if in_a_row >= patience:
            raise TrainingDiverged(
                f"training diverged: the last {in_a_row} steps (to step {step}) were all skipped, their gradient "
                f"norms over {self.factor:g} x the running reference {float(self.reference):.3g} or not finite, so "
                f"the weights have stopped moving. Resume from an earlier checkpoint with a lower lr "
                f"(or encoder_lr_scale), or train a new model with projector_input_norm: true; "
                f"skip_spikes_patience sets how many skipped steps in a row end a run")

    def state_dict(self) -> dict[str, float | bool]:
        """Plain numbers for a checkpoint (a host read: checkpoints wait for the device anyway)."""
        if self.reference is None:
            return {}
        return {"reference": float(self.reference), "seen": bool(self.seen), "skipped": float(self.skipped),
                "in_a_row": float(self.in_a_row)}

    def load_state_dict(self, state: dict[str, float | bool], device: torch.device) -> None:
        """Resume with the saved reference (a resumed run's first step is judged like any other)."""
        if not state:
            return
        self.reference = torch.tensor(float(state["reference"]), device=device)
        self.seen = torch.tensor(bool(state["seen"]), device=device)
        self.skipped = torch.tensor(float(state["skipped"]), device=device)
        self.in_a_row = torch.tensor(float(state.get("in_a_row", 0.0)), device=device)
