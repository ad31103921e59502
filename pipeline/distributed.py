"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the VLM, and the state it must gather.

Pure torch (no Ray): the train loop calls these inside Ray Train's process group; tests call
them in plain ``torch.distributed`` processes. What lives here and why:

- ``shard_model``: one FSDP group per repeated block (SAM blocks, CLIP layers, GPT blocks)
  plus the root for the rest (patch/pos embeddings, neck, compressor, projector, wte,
  lm_head). Per-block groups are what make FSDP pay off: only one block's parameters are
  gathered at a time, and the next block's all-gather overlaps the current block's compute.
  A root-only wrap would gather the whole model at once (no memory saved). Unlike FSDP1's
  flat parameters, every parameter keeps its name and its 2-D shape (as a DTensor sharded on
  dim 0), so ``pipeline.optim.build_optimizer`` groups and Muon still see matrices.
- ``full_model_state`` / ``full_optimizer_state``: checkpoints stay in the one-GPU layout
  (full tensors, optimizer state keyed by parameter index), so a checkpoint written by FSDP
  on N GPUs resumes under DDP or on one GPU, and the reverse through ``shard_optimizer_state``.
- ``vision_on_every_rank``: a micro-batch row that runs the vision tower without changing
  the loss, for a rank whose micro-batch has no image while another rank's has.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from model.vlm import ImageViews, NanoDeepseekOCR, slot_count
from pipeline.mixture import PackedBatch


def repeated_blocks(model: NanoDeepseekOCR) -> list[nn.Module]:
    """The blocks that get their own FSDP group, in forward order."""
    return [*model.sam_model.blocks, *model.vision_model.transformer.layers, *model.gpt.transformer.h]


def shard_model(model: NanoDeepseekOCR, device: torch.device) -> NanoDeepseekOCR:
    """Shard ``model`` over the default process group with FSDP2, one group per repeated block.

    Every rank must hold identical weights before the call (same seed or same checkpoint):
    ``fully_shard`` keeps each rank's own slice and does not broadcast. Frozen parameters
    (CLIP's bypassed patch embedding, stage 2's SAM) are sharded too and simply get no
    gradient. No ``MixedPrecisionPolicy``: the loop runs under bf16 autocast with fp32
    master weights, as DDP does. Returns the same module, now an ``FSDPModule``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs an initialised torch.distributed process group")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the mesh and NCCL use the current device
    model.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_value(value: torch.Tensor | float) -> torch.Tensor | float:
    """A plain tensor from one that may be a DTensor (``clip_grad_norm_`` under FSDP2): a
    collective for a DTensor, a device op with no host sync; anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def to_float(value: torch.Tensor | float) -> float:
    """A Python float from a scalar that may be a DTensor (``clip_grad_norm_`` under FSDP2)."""
    return float(full_value(value))


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as full CPU tensors on rank 0 ({} elsewhere).

    A collective: every rank must call it. Keys are the unsharded model's keys.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(state: dict, keep: bool) -> dict | None:
    """``Optimizer.state_dict()`` with every DTensor gathered into a full CPU tensor.

    A collective: every rank calls it on its own optimizer (same parameters, same order), and
    tensors are visited in sorted order so that the all-gathers pair up. Only the rank with
    ``keep`` builds the result (others return None and hold one full tensor at a time).
    """
    out: dict[Any, dict[str, Any]] = {}
    for index in sorted(state["state"]):
        entry = {}
        for key in sorted(state["state"][index]):
            value = state["state"][index][key]
            if isinstance(value, DTensor):
                value = value.full_tensor()
                value = value.cpu() if keep else None
            entry[key] = value
        out[index] = entry
    return {"state": out, "param_groups": state["param_groups"]} if keep else None


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full (one-GPU layout) optimizer state dict with each parameter-shaped tensor cut to
    the local shard of its DTensor parameter, ready for ``optimizer.load_state_dict``.

    No communication: every rank read the same full state, and keeps its own slice.
    Scalars such as Adam's ``step`` stay as they are.
    """
    saved_ids = [i for g in state["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(saved_ids) != len(params):
        raise ValueError(f"optimizer state covers {len(saved_ids)} parameters, this optimizer {len(params)}")
    by_id = dict(zip(saved_ids, params))
    out = {}
    for index, entry in state["state"].items():
        p = by_id[index]
        if isinstance(p, DTensor):
            entry = {k: _shard_like(v, p) for k, v in entry.items()}
        out[index] = entry
    return {"state": out, "param_groups": state["param_groups"]}


def _shard_like(value: Any, param: DTensor) -> Any:
    if not torch.is_tensor(value) or isinstance(value, DTensor) or tuple(value.shape) != tuple(param.shape):
        return value
    full = value.to(device=param.to_local().device,
                    dtype=param.dtype if value.is_floating_point() else value.dtype)
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    # the local shard is a view of the full tensor: copy it so that the full one can be freed
    return DTensor.from_local(shard.to_local().clone(), param.device_mesh, param.placements,
                              shape=param.shape, stride=param.stride())


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` on any rank, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def vision_on_every_rank(batch: PackedBatch, model: NanoDeepseekOCR, device: torch.device) -> PackedBatch:
    """``batch``, plus a row with a blank image when this rank has no image but another has.

    Why: FSDP2 reduce-scatters only the gradients a rank produced, so if one rank's
    micro-batch has images and another's is text only, the vision groups' reduce-scatters
    would not pair up and the job would hang (DDP covers this with find_unused_parameters).
    The added row holds the smallest image the encoders take (one compressed patch, 3 slots)
    in its own segment with no targets: nothing attends to it and it adds no loss, so the
    vision gradients it produces are exactly zero. A collective: every rank must call it.
    """
    if not any_rank(bool(batch.images), device) or batch.images:
        return batch
    seq_len = batch.input_ids.shape[1]
    size = model.config.sam.patch_size * 4
    n = slot_count(1)
    if n > seq_len:
        raise ValueError(f"seq_len {seq_len} cannot hold the {n} slots of a blank image")
    like = dict(dtype=torch.long, device=batch.input_ids.device)
    ids = torch.zeros(1, seq_len, **like)
    ids[0, :n] = model.config.image_token_id
    positions = torch.zeros(1, seq_len, **like)
    positions[0, :n] = torch.arange(n, **like)
    segments = torch.full((1, seq_len), -1, **like)
    segments[0, :n] = 0
    u8 = dict(dtype=torch.uint8, device=batch.input_ids.device)
    image = ImageViews(torch.zeros(3, size, size, **u8), torch.zeros(0, 3, 1, 1, **u8))
    return PackedBatch(torch.cat([batch.input_ids, ids]), torch.cat([batch.targets, torch.full_like(ids, -1)]),
                       torch.cat([batch.positions, positions]), torch.cat([batch.segment_ids, segments]),
                       [image], batch.n_samples, batch.n_target_tokens, [None])
