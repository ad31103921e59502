"""The glyph loss: training-only heads that name the characters under the encoder's features.

Why: trained from random init on the next-token loss alone, the vision slots collapse to one
direction before the decoder reads anything, and pages never leave the language-model floor
(``bench/RESULTS.md``, Tier 2 sessions 6-8). Two heads give the encoder a direct signal:

- a **cell** head on each global-view slot (after the projector, centred as the model centres
  them). By default (``cell_target="bag"``) it predicts which characters lie in its 64 px cell:
  a BCE per class, its bias started at the prior's log-odds (from 0 it spends hundreds of steps
  walking there). ``"grid"`` asks for the character under each of the cell's 4 x 4 patches, in
  place: a balanced cross-entropy like the patch head's. A reader needs the order as well as the
  set, and this head's error says how much of it survives the compressor;
- a **patch** head on each 16 px position of SAM's neck (before the compressor) names the
  character centred there or none: a cross-entropy in which glyph patches and empty patches
  weigh the same. This one is what made random-init lines read in ``bench/tier2_micro.py``.

The heads read the towers' outputs through forward hooks, so the model's forward (and its DDP
or FSDP wrapper) stays as it is; they are trained with the model, saved beside a checkpoint
for resuming, and never part of the model's weights.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from model.config import VLMConfig
from model.vlm import center_slots
from pipeline.glyphs import CELL, N_CLASSES, PATCH, cell_targets, patch_targets, patches_by_cell

PRIOR_LOGIT = -4.0  # a character class in a cell of a page: a few percent (bench/RESULTS.md, session 7)
CELL_TARGETS = ("bag", "grid")  # what the cell head asks of a slot: its characters, or each of its patches' one
CELL_PATCHES = (CELL // PATCH) ** 2  # 16 patches of SAM's neck in one slot cell
ATTRIBUTE = "glyph_heads"  # the heads' submodule name on the model while it trains
STATE_FILE = "glyph_heads.safetensors"  # beside a checkpoint's model.safetensors


class GlyphHeads(nn.Module):
    """The cell and patch heads, and the hooks that collect what they read."""

    def __init__(self, config: VLMConfig, cell_target: str = "bag") -> None:
        super().__init__()
        if cell_target not in CELL_TARGETS:
            raise ValueError(f"cell_target must be one of {CELL_TARGETS}, got {cell_target!r}")
        self.cell_target = cell_target
        if cell_target == "bag":
            self.cell = nn.Linear(config.gpt.n_embd, N_CLASSES)
            nn.init.constant_(self.cell.bias, PRIOR_LOGIT)
        else:  # one class (or none) for each of the cell's patches
            self.cell = nn.Linear(config.gpt.n_embd, CELL_PATCHES * (N_CLASSES + 1))
        self.patch = nn.Conv2d(config.sam.neck_dim, N_CLASSES + 1, 1)
        self.centering = config.slot_centering
        self._neck: list[torch.Tensor] = []
        self._slots: list[torch.Tensor] = []
        self._slot_inputs_absmax: list[torch.Tensor] = []
        self._hooks: list = []

    def attach(self, model: nn.Module) -> None:
        """Collect the neck's and the projector's outputs of each forward pass that builds a graph
        (evaluation and sample predictions run without one and leave nothing behind)."""
        def keep(store: list[torch.Tensor]):
            def hook(_module, _inputs, output):
                if torch.is_grad_enabled():
                    store.append(output)
            return hook

        def keep_slots(_module, inputs, output):
            if torch.is_grad_enabled():
                self._slots.append(output)
                self._slot_inputs_absmax.append(inputs[0].detach().abs().amax())

        self.detach()
        self._hooks = [model.sam_model.neck.register_forward_hook(keep(self._neck)),
                       model.projector.register_forward_hook(keep_slots)]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._neck.clear()
        self._slots.clear()
        self._slot_inputs_absmax.clear()

    def loss(self, glyphs: Sequence[np.ndarray | None]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(cell loss + patch CE, detached parts) for the views of the last forward pass, one global
        view per image in ``glyphs``' order; images without glyphs add nothing."""
        neck, slots = torch.cat(self._neck), torch.cat(self._slots)
        inputs_absmax = torch.stack(self._slot_inputs_absmax).amax()
        self._neck.clear()
        self._slots.clear()
        self._slot_inputs_absmax.clear()
        if neck.shape[0] != len(glyphs):
            raise RuntimeError(f"the glyph loss needs one global view per image: the towers saw {neck.shape[0]} "
                               f"views for {len(glyphs)} images (a mode with tiles?)")
        health = slot_health(slots.detach(), inputs_absmax, self.centering)
        keep = [i for i, g in enumerate(glyphs) if g is not None]
        if not keep:  # every parameter still takes part (DDP expects a gradient for each)
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero, health
        view_size = neck.shape[-1] * PATCH
        device = neck.device
        index = _to_device(np.asarray(keep), device)
        patch_classes = np.stack([patch_targets(glyphs[i], view_size) for i in keep])
        patches = _to_device(patch_classes, device)
        slot_vectors = slots.index_select(0, index).float()
        slot_vectors = center_slots(slot_vectors) if self.centering else slot_vectors
        parts = {}
        if self.cell_target == "bag":
            cells = _to_device(np.stack([cell_targets(glyphs[i], view_size) for i in keep]), device)
            cell_loss = nn.functional.binary_cross_entropy_with_logits(self.cell(slot_vectors), cells.float())
        else:
            in_place = _to_device(patches_by_cell(patch_classes, view_size), device)  # the same classes by slot
            logits = self.cell(slot_vectors).unflatten(-1, (CELL_PATCHES, N_CLASSES + 1))  # [n, cells, 16, C+1]
            cell_loss, cell_wrong = balanced_patch_loss(logits, in_place)
            parts["glyph_cell_error"] = cell_wrong.detach()
        logits = self.patch(neck.index_select(0, index).float()).flatten(2).transpose(1, 2)  # [n, patches, C+1]
        patch_loss, wrong = balanced_patch_loss(logits, patches)
        return cell_loss + patch_loss, {"glyph_cell_loss": cell_loss.detach(), "glyph_patch_loss": patch_loss.detach(),
                                        "glyph_patch_error": wrong.detach(), **parts, **health}


def slot_health(slots: torch.Tensor, inputs_absmax: torch.Tensor, centering: bool) -> dict[str, torch.Tensor]:
    """Device scalars on what the decoder is handed (the spikes of sessions 16-17 come from the vision
    side): the projector's largest input magnitude, and the mean and smallest RMS of the slots as the
    GPT's first norm sees them (centred like the model centres them). A slot near zero RMS is
    one that norm scales up most, in the forward pass and in its gradient."""
    slots = slots.float()
    rms = (center_slots(slots) if centering else slots).pow(2).mean(-1).sqrt()
    return {"slot_rms_mean": rms.mean(), "slot_rms_min": rms.amin(), "projector_input_absmax": inputs_absmax.float()}


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without waiting for the device (pinned, asynchronous copy)."""
    t = torch.as_tensor(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def balanced_patch_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy with glyph patches and empty patches (class 0) weighing the same, the share
    of glyph patches named wrong) of [..., classes] logits against [...] class targets: empty
    patches are most of a page, and an unweighted mean would teach "none" first. A kind of
    patch that is absent adds nothing; no value is read back to the host (no device sync)."""
    ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="none").reshape(targets.shape)
    glyph = targets > 0

    def mean_over(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return (values * mask).sum() / mask.sum().clamp(min=1)

    loss = mean_over(glyph, ce) + mean_over(~glyph, ce)
    wrong = mean_over(glyph, (logits.argmax(-1) != targets).float())
    return loss, wrong


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's weights, the glyph heads' weights) of a training model's state dict."""
    prefix = ATTRIBUTE + "."
    heads = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(prefix)}, heads
