"""Finding and loading the checkpoint a replica serves, and only the half of the model it needs.

Encoder replicas keep the vision tower (SAM, CLIP, projector); decoder replicas keep the GPT.
Dropping the other half matters at full size: each replica would otherwise hold ~1B params.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from model.weights import CONFIG_FILE, MODEL_FILE, CheckpointError, load_checkpoint, read_checkpoint_config

DEFAULT_ARTIFACTS = "artifacts"


def _is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def find_latest_checkpoint(artifacts: str | os.PathLike = DEFAULT_ARTIFACTS, stage: int = 2) -> Path:
    """The newest stage-``stage`` checkpoint under ``artifacts`` (a directory with model + config).

    Looks first at the exported finals (``<artifacts>/runs/stage2-*/final``, what
    ``jobs/stage2.py`` writes), then anywhere below a directory whose name starts with
    ``stage2``; the most recently written one wins.
    """
    root = Path(artifacts)
    found = [p for p in root.glob(f"runs/stage{stage}-*/final") if _is_checkpoint(p)]
    if not found and root.is_dir():
        found = [cfg.parent for cfg in root.rglob(CONFIG_FILE)
                 if _is_checkpoint(cfg.parent)
                 and any(part.startswith(f"stage{stage}") for part in cfg.parent.relative_to(root).parts)]
    if not found:
        raise CheckpointError(
            f"no stage-{stage} checkpoint under {root.resolve()} (looked for runs/stage{stage}-*/final and "
            f"stage{stage}*/**/{MODEL_FILE}); train one with `python jobs/stage{stage}.py` or pass --checkpoint PATH")
    # a copied checkpoint keeps its files' old mtimes; its directory's mtime is when it was written here
    return max(found, key=lambda p: max(p.stat().st_mtime, (p / MODEL_FILE).stat().st_mtime)).resolve()


def resolve_checkpoint(checkpoint: str | os.PathLike | None, artifacts: str | os.PathLike = DEFAULT_ARTIFACTS) -> Path:
    """An absolute checkpoint directory: the given one (checked) or the latest stage-2 one."""
    if checkpoint in (None, "", "latest"):
        return find_latest_checkpoint(artifacts)
    from pipeline import storage

    if storage.is_remote(str(checkpoint)):  # s3://: every replica reads a local cached copy
        checkpoint = storage.localize_dir(str(checkpoint))
    path = Path(checkpoint).expanduser().resolve()
    read_checkpoint_config(path)  # raises CheckpointError naming what is missing
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"{path}: {MODEL_FILE} is missing")
    return path


def checkpoint_meta(checkpoint: str | os.PathLike) -> dict:
    """config.json of a checkpoint (model config + extras such as ``processor.mode``), no weights."""
    return read_checkpoint_config(checkpoint)


def default_mode(meta: dict, fallback: str = "gundam") -> str:
    return (meta.get("processor") or {}).get("mode") or fallback


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or None) picks CUDA when this replica was given a GPU, else the CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on GPUs, float32 on CPUs (CPU bf16 matmuls are slow and lossy)."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


def load_part(checkpoint: str | os.PathLike, part: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, meta) with only ``part`` ("vision" or "language") kept, in eval mode."""
    if part not in ("vision", "language"):
        raise ValueError(f"part must be 'vision' or 'language', got {part!r}")
    model, tokenizer, meta = load_checkpoint(checkpoint, device="cpu", with_tokenizer=part == "language")
    if part == "vision":
        model.gpt = nn.Identity()  # encode_images never touches the GPT
    else:
        model.sam_model = nn.Identity()  # merge_embeddings only needs gpt.embed and the <image> id
        model.vision_model = nn.Identity()
        model.projector = nn.Identity()
        if tokenizer is None:
            raise CheckpointError(f"{checkpoint}: tokenizer.json is missing; the decoder needs it")
    return model.to(device=device, dtype=dtype).eval(), tokenizer, meta
