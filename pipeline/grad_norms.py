"""Pre-clip gradient norms by model part: where a grad-norm spike comes from.

The trainer logs one ``grad_norm``, the norm that clipping sees. A spike of 1e9 in it (tier-2
session 16) says a step was clipped hard, not which part of the model sent it: SAM, the 16x
compressor, CLIP, the projector, the GPT or the glyph heads. On the steps that report, the
trainer adds ``grad_norm_<part>`` for each part, computed before clipping and kept on the device
until the report reads it, and ``weight_norm_<part>``, the norm of that part's weights. (Not
``grad_norm/<part>``: MLflow's file store keeps a metric in a file of its name, and ``grad_norm``
cannot be a file and a folder at once.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from pipeline.glyph_loss import ATTRIBUTE as GLYPH_HEADS

PARTS = ("sam", "compressor", "clip", "projector", "gpt", GLYPH_HEADS)
# (parameter-name prefix, part): the first prefix that matches names the part
PART_PREFIXES = (
    ("sam_model.net_2.", "compressor"), ("sam_model.net_3.", "compressor"), ("sam_model.", "sam"),
    ("vision_model.", "clip"), ("projector.", "projector"), ("image_newline", "projector"),
    ("view_seperator", "projector"), ("gpt.", "gpt"), (GLYPH_HEADS + ".", GLYPH_HEADS),
)


def part_of(name: str) -> str:
    """The part of the model a parameter belongs to, by its name in the unwrapped model."""
    for prefix, part in PART_PREFIXES:
        if name.startswith(prefix):
            return part
    return "other"


def parameters_by_part(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``model`` (unwrapped: no DDP ``module.`` prefix) by part."""
    parts: dict[str, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts.setdefault(part_of(name), []).append(p)
    return parts


def part_grad_norms(parts: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """``{"grad_norm_<part>": norm}`` of the current gradients, as device tensors (no host sync).

    Sharded (FSDP2) gradients add their squares over the ranks, a collective that every rank
    reaches at the same step since all hold the same kinds of gradients. Parts without
    gradients are left out.
    """
    return _part_norms({part: [p.grad for p in params if p.grad is not None] for part, params in parts.items()},
                       "grad_norm_")


def part_weight_norms(parts: dict[str, list[nn.Parameter]]) -> dict[str, torch.Tensor]:
    """``{"weight_norm_<part>": norm}`` of the parameters themselves (device tensors): a part whose
    weights grow step after step is where activations, and the gradients that scale with
    them, grow too (sharded parameters as in :func:`part_grad_norms`)."""
    return _part_norms({part: [p.detach() for p in params] for part, params in parts.items()}, "weight_norm_")


def _part_norms(tensors_by_part: dict[str, list[torch.Tensor]], prefix: str) -> dict[str, torch.Tensor]:
    names, shard_sq, whole_sq, any_shard = [], [], [], False
    for part, tensors in sorted(tensors_by_part.items()):
        if not tensors:
            continue
        shards = [t.to_local() for t in tensors if isinstance(t, DTensor)]  # this rank's slices
        whole = [t for t in tensors if not isinstance(t, DTensor)]
        device = (shards or whole)[0].device
        names.append(part)
        shard_sq.append(_square_norm(shards, device))
        whole_sq.append(_square_norm(whole, device))
        any_shard = any_shard or bool(shards)
    if not names:
        return {}
    sharded = torch.stack(shard_sq)
    if any_shard:
        torch.distributed.all_reduce(sharded)
    norms = (sharded + torch.stack(whole_sq)).sqrt()
    return {f"{prefix}{part}": norms[i] for i, part in enumerate(names)}


def _square_norm(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The squared 2-norm of ``tensors`` together (torch's foreach norm), 0 for none."""
    if not tensors:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(tensors).float().square()
