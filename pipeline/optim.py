"""Optimizers and learning-rate schedules for both training stages.

- ``adamw``: AdamW on everything (DeepSeek-OCR's recipe); fused on CUDA.
- ``muon``: nanochat's hybrid: Muon (momentum + Newton-Schulz orthogonalised updates) for the
  GPT's block matrices, AdamW for embeddings, the head, norms and the whole vision side.

Both work on FSDP2's DTensor parameters (sharded on dim 0) as well as on plain tensors.

Schedules return a multiplier of each group's base lr: warmup + cosine (stage 1) and step
decay (stage 2).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximate the nearest semi-orthogonal matrix (U V^T of the SVD) by a quintic
    Newton-Schulz iteration; its coefficients push singular values towards 1 quickly."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if transposed else x


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update for each 2-D weight is orthogonalised (Muon).

    Matrices of one shape are orthogonalised together in one batched Newton-Schulz (a GPT's
    blocks repeat a few shapes): a step launches a few dozen kernels instead of ~30 per matrix,
    which on a GPU is the difference between waiting on the host and not. FSDP2's sharded
    (DTensor) parameters go one by one, each gathered whole (see ``_orthogonal_update``).
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None, keep: torch.Tensor | None = None):
        """One update; ``keep`` (a 0-dim device tensor, 1 or 0) decides on the device whether it is
        applied at all: 0 leaves the weights and the momentum as they were, with no host sync."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes matrices; got a parameter of shape {tuple(p.shape)}")
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            momentum = group["momentum"]
            if keep is not None:  # a skipped step's gradient (maybe not finite) is the buffer itself: it stays
                ok = keep.bool()
                grads = [torch.where(ok, g, buf) for g, buf in zip(grads, bufs)]
            if any(isinstance(p, DTensor) for p in params):
                for p, g, buf in zip(params, grads, bufs):
                    buf.lerp_(g, 1 - momentum)
                    update = g.lerp(buf, momentum) if group["nesterov"] else buf
                    orthogonal = _orthogonal_update(update, group["ns_steps"], p.dtype)
                    p.add_(orthogonal if keep is None else torch.where(ok, orthogonal, 0.0),
                           alpha=-group["lr"] * _scale(p))
                continue
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            same_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                same_shape.setdefault((tuple(p.shape), p.dtype, p.device), []).append(i)
            for (_, dtype, _), index in same_shape.items():
                stacked = torch.stack([updates[i] for i in index])
                orthogonal = orthogonalize(stacked, group["ns_steps"]).to(dtype)
                orthogonal = (orthogonal if keep is None else torch.where(ok, orthogonal, 0.0)).unbind(0)
                torch._foreach_add_([params[i] for i in index], orthogonal,
                                    alpha=-group["lr"] * _scale(params[index[0]]))


def _scale(p: torch.Tensor) -> float:
    """Muon's shape factor: tall matrices take larger steps, sqrt(rows / cols)."""
    return max(1.0, p.size(0) / p.size(1)) ** 0.5


def _orthogonal_update(update: torch.Tensor, ns_steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The orthogonalised update, sharded like ``update`` when it is a DTensor (FSDP2).

    Newton-Schulz needs the whole matrix, so a sharded update is all-gathered, orthogonalised
    on every rank (the same result everywhere) and cut back to this rank's shard locally.
    The all-gather is a collective: every rank steps the same parameters in the same order.
    """
    if not isinstance(update, DTensor):
        return orthogonalize(update, ns_steps).to(dtype)
    full = orthogonalize(update.full_tensor(), ns_steps).to(dtype)
    return distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)


class CombinedOptimizer:
    """Several optimizers stepped together, exposing one state dict (for checkpoints)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, skip: torch.Tensor | None = None) -> None:
        """Step every optimizer; ``skip`` (a 0-dim float device tensor, 1.0 = skip) leaves weights
        and states untouched when set, decided on the device (no host sync): fused AdamW reads it
        as its ``found_inf``, Muon as ``keep = 1 - skip``."""
        if skip is None:
            for o in self.optimizers:
                o.step()
            return
        for o in self.optimizers:
            if isinstance(o, Muon):
                o.step(keep=1.0 - skip)
            elif isinstance(o, torch.optim.AdamW) and all(g.get("fused") for g in o.param_groups):
                o.found_inf = skip  # what GradScaler hands a fused optimizer: the kernel leaves it all as it was
                try:
                    o.step()
                finally:
                    del o.found_inf
            else:
                raise ValueError(f"a step can be skipped on the device only with fused AdamW or Muon, not {o!r}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(saved)} parts, this optimizer {len(self.optimizers)}")
        for o, s in zip(self.optimizers, saved):
            encoder = [g.get("encoder", False) for g in o.param_groups]
            o.load_state_dict(s)
            for g, flag in zip(o.param_groups, encoder):  # states saved before the flag existed lack it
                g["encoder"] = flag


def _is_muon_param(name: str, p: nn.Parameter) -> bool:
    return p.ndim == 2 and ".transformer.h." in f".{name}" and "gpt." in f"{name}"


def _is_encoder_param(name: str) -> bool:
    return any(f"{part}." in f".{name}" for part in (".sam_model", ".vision_model"))


def _adamw_groups(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                  encoder_lr_scale: float) -> list[dict]:
    """Decay on matrices only; the vision encoders at ``lr * encoder_lr_scale``."""
    groups = []
    for encoder in (False, True):
        for decay in (True, False):
            ps = [p for n, p in params if _is_encoder_param(n) == encoder and (p.ndim >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0,
                               "lr": lr * (encoder_lr_scale if encoder else 1.0), "encoder": encoder})
    return groups


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.95), muon_lr: float = 0.02,
                    encoder_lr_scale: float = 1.0, fused: bool | None = None) -> CombinedOptimizer:
    """The named optimizer over the trainable parameters; each group remembers its base lr.

    ``fused`` AdamW (default: when every parameter is on CUDA) is what can skip a step on the
    device (``CombinedOptimizer.step(skip=...)``); torch has it on the CPU too.

    ``encoder_lr_scale`` scales the lr of SAM + CLIP: randomly initialised encoders that move
    as fast as the decoder keep changing the features the decoder is learning to read.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if fused is None:
        fused = all(p.is_cuda for _, p in params)
    if name == "adamw":
        opts = [torch.optim.AdamW(_adamw_groups(params, lr, weight_decay, encoder_lr_scale), lr=lr,
                                  betas=betas, fused=fused)]
    elif name == "muon":
        matrices = [(n, p) for n, p in params if _is_muon_param(n, p)]
        rest = [(n, p) for n, p in params if not _is_muon_param(n, p)]
        opts = []
        if rest:
            opts.append(torch.optim.AdamW(_adamw_groups(rest, lr, weight_decay, encoder_lr_scale), lr=lr,
                                          betas=betas, fused=fused))
        if matrices:
            opts.append(Muon([p for _, p in matrices], lr=muon_lr))
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose adamw or muon")
    for o in opts:
        for g in o.param_groups:
            g["base_lr"] = g["lr"]
            g.setdefault("encoder", False)  # SAM / CLIP groups: set_lr's encoder_multiplier applies
    return CombinedOptimizer(opts)


SCHEDULES = ("cosine", "step", "warmdown", "constant")


def lr_multiplier(step: int, total: int, schedule: str, warmup: int = 0, min_frac: float = 0.1,
                  milestones: Iterable[float] = (0.5, 0.8), gamma: float = 0.1, warmdown: float = 0.4) -> float:
    """Multiplier of the base lr at ``step`` (0-based) of ``total``.

    ``warmdown`` (warmup, then constant, then linear to ``min_frac`` over the last ``warmdown``
    share of the steps, as nanochat trains) keeps the full lr as long as the loss still falls
    fast and gives the decay, where the loss drops most, more than one step of a step schedule.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        passed = sum(step >= m * total for m in milestones)
        return gamma ** passed
    if schedule == "warmdown":
        start = total * (1 - warmdown)
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / max(1.0, total - start))
        return 1.0 + (min_frac - 1.0) * progress
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def set_lr(optimizer: CombinedOptimizer, multiplier: float, encoder_multiplier: float = 1.0) -> float:
    """Each group's lr = its base lr x ``multiplier``, SAM's and CLIP's groups also x
    ``encoder_multiplier`` (0 holds them still while the rest trains); returns the first group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier * (encoder_multiplier if g.get("encoder", False) else 1.0)
    return optimizer.param_groups[0]["lr"]
