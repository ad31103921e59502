"""Dataclass configs for every part of the network, and the named presets.

One place holds the shapes so that the modules, the checkpoint format (``config.json``)
and the command line agree. Presets:

- ``tiny``: a few hundred thousand parameters per part; CPU forward+backward in well under
  a second. Used by tests, the demo and the CI.
- ``small``: one GPU, trains to something readable in minutes.
- ``full``: DeepSeek-OCR's DeepEncoder (SAM-ViT-B + 16x compressor + CLIP-L), the linear
  projector and a nanochat d20 GPT (560,988,160 parameters).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SAMConfig:
    """SAM ViT image encoder with neck and the two stride-2 compressor convs (net_2, net_3)."""

    img_size: int = 1024  # size the absolute position table was trained for (64x64 at patch 16)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    neck_dim: int = 256  # neck output channels ("out_chans")
    net2_dim: int = 512
    net3_dim: int = 1024  # must equal CLIPConfig.hidden_size: these are CLIP's patch embeddings
    layer_norm_eps: float = 1e-6

    @property
    def pos_grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class CLIPConfig:
    """CLIP ViT that takes SAM's compressed features as patch embeddings."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 224  # the position table covers (image_size // patch_size)^2 + 1 positions
    patch_size: int = 14
    layer_norm_eps: float = 1e-5

    @property
    def pos_grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class GPTConfig:
    """nanochat's GPT config (same field names as nanochat's ``model_config`` meta)."""

    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    rope_base: float = 10000.0
    logit_softcap: float = 15.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def nanochat_dict(self) -> dict[str, int]:
        """The fields a nanochat ``meta_*.json`` carries under ``model_config``."""
        keys = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
        return {k: getattr(self, k) for k in keys}


@dataclass
class VLMConfig:
    """DeepEncoder + projector + GPT."""

    sam: SAMConfig = field(default_factory=SAMConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    preset: str = "custom"
    image_token_id: int = 0  # the tokenizer's <image> id; set when the tokenizer is known
    # Subtract each view's mean slot embedding after the projector. For encoders trained from
    # random init: what every slot of a view shares (white paper, biases) is most of a slot's
    # vector, and once the GPT's input RMSNorm scales it, the glyph-specific rest is small, so the
    # decoder takes longer to start reading (bench/tier2_micro.py: 136 against 371 steps with a
    # CNN stem). DeepSeek-OCR's weights were trained without it: imported checkpoints keep it off.
    slot_centering: bool = False
    # Layer-normalise the projector's two inputs (CLIP's output and SAM's compressed features, each
    # on its own channels, no learned scale) before the linear map. For encoders trained from random
    # init: nothing in DeepSeek-OCR's network bounds CLIP's last residual stream, and the GPT's input
    # RMSNorm hides its scale from the loss, so it can grow unchecked; in tier-2 runs it reached
    # ~7,000 by step 775 and every later gradient burst (bench/RESULTS.md, session 18). Adds no
    # weights; DeepSeek-OCR's checkpoints were trained without it and keep it off.
    projector_input_norm: bool = False

    @property
    def projector_in(self) -> int:
        """[CLIP output ; SAM flat] concatenated on the channel axis."""
        return self.clip.hidden_size + self.sam.net3_dim

    def validate(self) -> None:
        if self.sam.net3_dim != self.clip.hidden_size:
            raise ValueError(
                f"sam.net3_dim ({self.sam.net3_dim}) must equal clip.hidden_size "
                f"({self.clip.hidden_size}): SAM's compressed features are CLIP's patch embeddings"
            )
        if self.gpt.n_embd % self.gpt.n_head:
            raise ValueError(f"gpt.n_embd {self.gpt.n_embd} is not divisible by n_head {self.gpt.n_head}")
        if self.gpt.n_head % self.gpt.n_kv_head:
            raise ValueError(f"gpt.n_head {self.gpt.n_head} is not a multiple of n_kv_head {self.gpt.n_kv_head}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VLMConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown VLMConfig fields: {sorted(unknown)}")
        sam = dict(d.get("sam", {}))
        if "global_attn_indexes" in sam:
            sam["global_attn_indexes"] = tuple(sam["global_attn_indexes"])
        cfg = cls(
            sam=_build(SAMConfig, sam, "sam"),
            clip=_build(CLIPConfig, d.get("clip", {}), "clip"),
            gpt=_build(GPTConfig, d.get("gpt", {}), "gpt"),
            preset=d.get("preset", "custom"),
            image_token_id=int(d.get("image_token_id", 0)),
            slot_centering=bool(d.get("slot_centering", False)),
            projector_input_norm=bool(d.get("projector_input_norm", False)),
        )
        cfg.validate()
        return cfg


def _build(klass: type, values: dict[str, Any], where: str) -> Any:
    """``klass(**values)``, refusing unknown keys by name (a typo in a YAML file is an error)."""
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {where} config fields: {sorted(unknown)}")
    return klass(**values)


def from_yaml(klass: type, path: str | None, where: str, **overrides: Any) -> Any:
    """A config dataclass from a YAML mapping plus overrides (``None`` overrides are ignored)."""
    import yaml
    from pathlib import Path

    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of {where} settings")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _build(klass, values, where)


def _tiny() -> VLMConfig:
    return VLMConfig(
        # window attention only: a global block over 1024 patches would dominate CPU time,
        # and CLIP already attends globally over the compressed grid
        sam=SAMConfig(img_size=512, embed_dim=32, depth=2, num_heads=2, window_size=8,
                      global_attn_indexes=(), neck_dim=16, net2_dim=32, net3_dim=64),
        clip=CLIPConfig(hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128),
        gpt=GPTConfig(sequence_len=1024, vocab_size=2048, n_layer=2, n_head=2, n_kv_head=2, n_embd=128),
        preset="tiny",
    )


def _small() -> VLMConfig:
    return VLMConfig(
        sam=SAMConfig(embed_dim=384, depth=6, num_heads=6, global_attn_indexes=(1, 3, 5),
                      neck_dim=256, net2_dim=512, net3_dim=768),
        clip=CLIPConfig(hidden_size=768, num_layers=8, num_heads=12, ffn_hidden_size=3072),
        gpt=GPTConfig(sequence_len=4096, vocab_size=8192, n_layer=8, n_head=4, n_kv_head=4, n_embd=512),
        preset="small",
    )


def _full() -> VLMConfig:
    return VLMConfig(sam=SAMConfig(), clip=CLIPConfig(), gpt=GPTConfig(sequence_len=8192), preset="full")


PRESETS = {"tiny": _tiny, "small": _small, "full": _full}


def preset(name: str) -> VLMConfig:
    """A fresh config for a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.validate()
    return cfg


@dataclass
class ProcessorConfig:
    """How an image becomes views and vision slots (DeepSeek-OCR's resolution modes)."""

    base_size: int = 1024  # global view size
    image_size: int = 640  # tile size
    crop_mode: bool = True  # tile large images (Gundam)
    min_crops: int = 2
    max_crops: int = 9
    patch_size: int = 16  # SAM patch
    downsample: int = 4  # the compressor's two stride-2 convs
    max_pixels: int = 50_000_000  # refuse larger images (decompression bombs)

    @property
    def global_grid(self) -> int:
        return self.base_size // (self.patch_size * self.downsample)

    @property
    def tile_grid(self) -> int:
        return self.image_size // (self.patch_size * self.downsample)


MODES: dict[str, dict[str, Any]] = {
    "tiny": dict(base_size=512, image_size=512, crop_mode=False),
    "small": dict(base_size=640, image_size=640, crop_mode=False),
    "base": dict(base_size=1024, image_size=1024, crop_mode=False),
    "large": dict(base_size=1280, image_size=1280, crop_mode=False),
    "gundam": dict(base_size=1024, image_size=640, crop_mode=True),
}


def processor_config(mode: str = "gundam", **overrides: Any) -> ProcessorConfig:
    """A ProcessorConfig for a named resolution mode, with explicit overrides."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    values = {**MODES[mode], **{k: v for k, v in overrides.items() if v is not None}}
    return ProcessorConfig(**values)
