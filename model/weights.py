"""Checkpoint I/O (safetensors; never pickle) and weight importers.

Importers map other layouts onto our module names and load them through ``load_into``, which
checks every key and shape and fails with one message naming all the problems:

- ``load_sam``: Hugging Face ``SamModel`` / ``SamVisionModel`` (e.g. ``facebook/sam-vit-base``).
- ``load_clip``: Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` (e.g. ``openai/clip-vit-large-patch14``);
  q, k, v are fused into ``qkv_proj``.
- ``load_deepseek_ocr_vision``: DeepSeek-OCR's released checkpoint, vision tensors only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from model.clip import CLIPEncoder
from model.config import CLIPConfig, SAMConfig
from model.sam import SAMEncoder, sam_mlp_dim

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
_LIST_LIMIT = 20  # keys listed per problem in an error message


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or does not fit the model."""


@dataclass
class LoadReport:
    """What a load did: keys copied, model keys left at init, checkpoint keys not used, keys skipped on purpose."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    what: str = ""

    def summary(self) -> str:
        parts = [f"{self.what or 'load'}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} not in checkpoint (kept init): {_fmt_keys(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected: {_fmt_keys(self.unexpected)}")
        if self.ignored:
            parts.append(f"{len(self.ignored)} ignored: {_fmt_keys(self.ignored, 5)}")
        return "; ".join(parts)


def _fmt_keys(keys: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    strict: bool = True,
    ignore_prefixes: Iterable[str] = (),
    allow_missing: Iterable[str] = (),
) -> LoadReport:
    """Copy ``state_dict`` into ``module`` after checking keys and shapes.

    Keys starting with ``ignore_prefixes`` are skipped and reported. With ``strict``, missing
    model keys (except those starting with ``allow_missing``) and unexpected checkpoint keys are
    errors; shape mismatches always are. Values are cast to each parameter's dtype and device.
    """
    ignore = tuple(ignore_prefixes)
    allowed = tuple(allow_missing)
    targets = module.state_dict(keep_vars=True)
    ignored = [k for k in state_dict if ignore and k.startswith(ignore)]
    skip = set(ignored)
    given = [k for k in state_dict if k not in skip]
    given_set = set(given)
    missing = [k for k in targets if k not in given_set]
    unexpected = [k for k in given if k not in targets]
    mismatched = [
        (k, tuple(state_dict[k].shape), tuple(targets[k].shape))
        for k in given
        if k in targets and tuple(state_dict[k].shape) != tuple(targets[k].shape)
    ]
    problems = []
    fatal_missing = [k for k in missing if not (allowed and k.startswith(allowed))]
    if strict and fatal_missing:
        problems.append(f"{len(fatal_missing)} missing keys: {_fmt_keys(fatal_missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_fmt_keys(unexpected)}")
    problems += [f"shape mismatch {k}: checkpoint {a} vs model {b}" for k, a, b in mismatched]
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))
    loaded = [k for k in given if k in targets]
    with torch.no_grad():
        for k in loaded:
            targets[k].copy_(state_dict[k])
    return LoadReport(loaded=loaded, missing=missing, unexpected=unexpected, ignored=ignored, what=what)


# ----------------------------------------------------------------------------- finding and reading files

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(
    src: PathLike, *, cache_dir: Optional[PathLike] = None, allow_download: bool = True
) -> Path:
    """A local file/directory as is, else a Hugging Face hub id: the local cache first, then a download."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    name = str(src)
    if not _REPO_ID.match(name):
        raise CheckpointError(f"checkpoint {name!r}: no such file or directory (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
    except Exception as err:  # not cached (the hub raises several error types)
        cached_err = err
    if not allow_download:
        raise CheckpointError(
            f"checkpoint {name!r}: not a local path and not in the Hugging Face cache "
            f"({type(cached_err).__name__}); downloads are disabled"
        )
    try:
        got = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"], cache_dir=cache_dir))
        if not any(got.glob("*.safetensors")):
            got = Path(snapshot_download(name, allow_patterns=["*.json", "pytorch_model*.bin"], cache_dir=cache_dir))
        return got
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {name!r}: not a local path, not in the Hugging Face cache, and the download failed: {err}"
        ) from err


def _weight_files(path: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) for a checkpoint file or directory."""
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors", [path]
        if path.suffix == ".bin":
            return "bin", [path]
        raise CheckpointError(f"{path}: expected a .safetensors (or pytorch .bin) file")
    if (path / "model.safetensors").exists():
        return "safetensors", [path / "model.safetensors"]
    for kind, index_glob in (("safetensors", "*.safetensors.index.json"), ("bin", "*.bin.index.json")):
        indexes = sorted(path.glob(index_glob))
        if len(indexes) == 1:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            files = [path / f for f in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{indexes[0]} names shards that are missing: {absent}")
            return kind, files
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files {[i.name for i in indexes]}; pass one file")
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return "safetensors", shards
    if (path / "pytorch_model.bin").exists():
        return "bin", [path / "pytorch_model.bin"]
    raise CheckpointError(f"{path}: no *.safetensors (or pytorch_model.bin) weights found")


class CheckpointReader:
    """Read-only, lazy view of a checkpoint's tensors: only the tensors asked for are read.

    safetensors files are opened with ``safe_open``; a ``.bin`` fallback is read whole with
    ``torch.load(weights_only=True)`` (no arbitrary pickle code).
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.kind, self.files = _weight_files(self.path)
        self._stack = ExitStack()
        self._where: dict[str, object] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        if self.kind == "safetensors":
            from safetensors import safe_open

            for f in self.files:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                for k in handle.keys():
                    if k in self._where:
                        raise CheckpointError(f"{self.path}: tensor {k!r} appears in more than one shard")
                    self._where[k] = handle
        else:
            for f in self.files:
                data = torch.load(f, map_location="cpu", weights_only=True)
                if not isinstance(data, dict):
                    raise CheckpointError(f"{f}: expected a state dict, got {type(data).__name__}")
                self._tensors.update(data)

    def keys(self) -> list[str]:
        return list(self._where) if self.kind == "safetensors" else list(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        if self.kind == "safetensors":
            return self._where[key].get_tensor(key)  # type: ignore[attr-defined]
        return self._tensors[key]

    def close(self) -> None:
        self._stack.close()
        self._tensors.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config_json(path: Path) -> dict:
    """config.json next to the weights ({} when there is none)."""
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        return {}
    return json.loads(cfg_file.read_text())


def _square(value: object, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{what} {value} is not square; only square sizes are supported")
        value = value[0]
    return int(value)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- SAM (Hugging Face layout)

# transformers' SamVisionConfig defaults (used when a saved config.json omits a field)
_HF_SAM_DEFAULTS = dict(
    hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=1024, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, mlp_ratio=4.0,
    use_abs_pos=True, use_rel_pos=True, window_size=14, global_attn_indexes=[2, 5, 8, 11], mlp_dim=None,
)


def sam_config_from_hf(cfg: Mapping) -> SAMConfig:
    """SAMConfig from a HF SamModel/SamVisionModel config.json; net_2/net_3 widths are 2x and 4x the neck."""
    vc = dict(_HF_SAM_DEFAULTS)
    vc.update(cfg.get("vision_config") or (cfg if cfg.get("model_type") != "sam" else {}))
    for flag, want in (("use_abs_pos", True), ("use_rel_pos", True), ("qkv_bias", True)):
        if bool(vc[flag]) != want:
            raise CheckpointError(f"sam config: {flag}={vc[flag]} is not supported (SAMEncoder needs {want})")
    if vc["hidden_act"] != "gelu":
        raise CheckpointError(f"sam config: hidden_act {vc['hidden_act']!r} is not supported (only exact 'gelu')")
    if int(vc["num_channels"]) != 3:
        raise CheckpointError(f"sam config: num_channels {vc['num_channels']} is not supported (only 3)")
    hidden = int(vc["hidden_size"])
    mlp_dim = int(vc["mlp_dim"]) if vc["mlp_dim"] else int(hidden * float(vc["mlp_ratio"]))
    neck = int(vc["output_channels"])
    out = SAMConfig(
        img_size=_square(vc["image_size"], "sam image_size"),
        patch_size=_square(vc["patch_size"], "sam patch_size"),
        embed_dim=hidden,
        depth=int(vc["num_hidden_layers"]),
        num_heads=int(vc["num_attention_heads"]),
        mlp_ratio=mlp_dim / hidden,
        window_size=int(vc["window_size"]),
        global_attn_indexes=tuple(int(i) for i in vc["global_attn_indexes"]),
        neck_dim=neck,
        net2_dim=2 * neck,
        net3_dim=4 * neck,
        layer_norm_eps=float(vc["layer_norm_eps"]),
    )
    if sam_mlp_dim(out) != mlp_dim:
        raise CheckpointError(f"sam config: mlp_dim {mlp_dim} is not representable as a ratio of {hidden}")
    return out


_SAM_NECK = {"conv1": "0", "layer_norm1": "1", "conv2": "2", "layer_norm2": "3"}
_SAM_LAYER_NORMS = {"layer_norm1": "norm1", "layer_norm2": "norm2"}


def _hf_sam_key(key: str) -> str:
    """HF SamVisionEncoder key (prefix stripped) -> SAMEncoder key; unknown keys pass through unchanged."""
    if key.startswith("patch_embed.projection."):
        return "patch_embed.proj." + key[len("patch_embed.projection."):]
    m = re.match(r"layers\.(\d+)\.([^.]+)\.(.+)$", key)
    if m:
        part = _SAM_LAYER_NORMS.get(m[2], m[2])
        return f"blocks.{m[1]}.{part}.{m[3]}"
    m = re.match(r"neck\.([^.]+)\.(.+)$", key)
    if m and m[1] in _SAM_NECK:
        return f"neck.{_SAM_NECK[m[1]]}.{m[2]}"
    return key


def _sam_state_dict(reader: CheckpointReader) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(SAMEncoder-named tensors, ignored checkpoint keys) for HF or original-SAM layouts."""
    keys = reader.keys()
    if any(k.startswith("vision_encoder.") for k in keys):
        prefix, mapper = "vision_encoder.", _hf_sam_key
    elif any(k.startswith("image_encoder.") for k in keys):  # the original segment-anything layout
        prefix, mapper = "image_encoder.", (lambda k: k)
    else:
        prefix, mapper = "", _hf_sam_key
    ours = {mapper(k[len(prefix):]): reader.get(k) for k in keys if k.startswith(prefix)}
    return ours, [k for k in keys if not k.startswith(prefix)]


def import_sam(
    src: PathLike, model: Optional[SAMEncoder] = None, config: Optional[SAMConfig] = None
) -> tuple[SAMEncoder, LoadReport]:
    """Like load_sam, also returning the LoadReport (net_2/net_3 are reported missing: SAM has none)."""
    path = resolve_source(src)
    if model is None:
        if config is None:
            hf_cfg = read_config_json(path)
            if not hf_cfg:
                raise CheckpointError(f"{path}: no config.json; pass a SAMConfig or a model")
            config = sam_config_from_hf(hf_cfg)
        model = SAMEncoder(config)
    with CheckpointReader(path) as reader:
        state, ignored = _sam_state_dict(reader)
        report = load_into(model, state, "sam", allow_missing=("net_2.", "net_3."))
    report.ignored += ignored
    log.info(report.summary())
    return model, report


def load_sam(src: PathLike, model: Optional[SAMEncoder] = None, config: Optional[SAMConfig] = None) -> SAMEncoder:
    """SAM ViT weights from a HF SAM checkpoint (dir or hub id) into a SAMEncoder (net_2/net_3 keep init).

    With no model and no config, the SAMConfig comes from the checkpoint's config.json.
    """
    return import_sam(src, model, config)[0]


# ----------------------------------------------------------------------------- CLIP (Hugging Face layout)

# transformers' CLIPVisionConfig defaults
_HF_CLIP_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


def _hf_clip_vision_section(cfg: Mapping) -> dict:
    vc = cfg.get("vision_config") or cfg.get("vision_config_dict")
    if vc is None:
        vc = {} if cfg.get("model_type") == "clip" else cfg
    out = dict(_HF_CLIP_DEFAULTS)
    out.update(vc)
    return out


def _check_clip_act(vc: Mapping) -> None:
    if vc["hidden_act"] != "quick_gelu":
        raise CheckpointError(
            f"clip config: hidden_act {vc['hidden_act']!r} is not supported; CLIPEncoder uses quick_gelu "
            "(OpenAI CLIP and DeepSeek-OCR)"
        )


def clip_config_from_hf(cfg: Mapping) -> CLIPConfig:
    """CLIPConfig from a HF CLIPModel/CLIPVisionModel config.json (the vision part)."""
    vc = _hf_clip_vision_section(cfg)
    _check_clip_act(vc)
    if int(vc["num_channels"]) != 3:
        raise CheckpointError(f"clip config: num_channels {vc['num_channels']} is not supported (only 3)")
    return CLIPConfig(
        hidden_size=int(vc["hidden_size"]),
        num_layers=int(vc["num_hidden_layers"]),
        num_heads=int(vc["num_attention_heads"]),
        ffn_hidden_size=int(vc["intermediate_size"]),
        image_size=_square(vc["image_size"], "clip image_size"),
        patch_size=_square(vc["patch_size"], "clip patch_size"),
        layer_norm_eps=float(vc["layer_norm_eps"]),
    )


def _clip_state_dict(reader: CheckpointReader) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(CLIPEncoder-named tensors with q/k/v fused, ignored checkpoint keys)."""
    keys = reader.keys()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
    ours: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    qkv: dict[tuple[str, str], dict[str, str]] = {}  # (layer, weight|bias) -> {q|k|v: checkpoint key}
    for k in keys:
        if not k.startswith(prefix):
            ignored.append(k)  # text tower, projections, logit_scale
            continue
        rest = k[len(prefix):]
        if rest.startswith("post_layernorm.") or rest == "embeddings.position_ids":
            ignored.append(k)
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)$", rest)
        if not m:
            ours[rest] = reader.get(k)
            continue
        layer, sub = m[1], m[2]
        mq = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", sub)
        if mq:
            qkv.setdefault((layer, mq[2]), {})[mq[1]] = k
        else:
            ours[f"transformer.layers.{layer}.{sub}"] = reader.get(k)
    for (layer, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            fused = torch.cat([reader.get(parts[p]) for p in "qkv"], dim=0)
            ours[f"transformer.layers.{layer}.self_attn.qkv_proj.{kind}"] = fused
        else:  # incomplete: leave the parts under their own names so the error names them
            for key in parts.values():
                ours[key] = reader.get(key)
    return ours, ignored


def import_clip(
    src: PathLike, model: Optional[CLIPEncoder] = None, config: Optional[CLIPConfig] = None
) -> tuple[CLIPEncoder, LoadReport]:
    """Like load_clip, also returning the LoadReport."""
    path = resolve_source(src)
    hf_cfg = read_config_json(path)
    if hf_cfg:
        _check_clip_act(_hf_clip_vision_section(hf_cfg))
    if model is None:
        if config is None:
            if not hf_cfg:
                raise CheckpointError(f"{path}: no config.json; pass a CLIPConfig or a model")
            config = clip_config_from_hf(hf_cfg)
        model = CLIPEncoder(config)
    with CheckpointReader(path) as reader:
        state, ignored = _clip_state_dict(reader)
        report = load_into(model, state, "clip")
    report.ignored += ignored
    log.info(report.summary())
    return model, report


def load_clip(src: PathLike, model: Optional[CLIPEncoder] = None, config: Optional[CLIPConfig] = None) -> CLIPEncoder:
    """CLIP vision weights from a HF CLIP checkpoint (dir or hub id) into a CLIPEncoder.

    Text tower, projections and post_layernorm are ignored (DeepSeek-OCR uses none of them).
    """
    return import_clip(src, model, config)[0]


# ----------------------------------------------------------------------------- DeepSeek-OCR

def load_deepseek_ocr_vision(
    src: PathLike,
    sam: SAMEncoder,
    clip: CLIPEncoder,
    projector: Optional[nn.Linear] = None,
    newline_param: Optional[torch.Tensor] = None,
    separator_param: Optional[torch.Tensor] = None,
) -> LoadReport:
    """Load DeepSeek-OCR's vision tensors (SAM, CLIP, projector, newline, view separator) in place.

    Only the vision tensors are read (safe_open), so the language model is never loaded. Parts
    passed as None are skipped and their keys reported as ignored, like the language model's.
    """
    path = resolve_source(src)
    report = LoadReport(what="deepseek-ocr vision")
    with CheckpointReader(path) as reader:
        keys = reader.keys()
        root = "model." if any(k.startswith("model.sam_model.") for k in keys) else ""
        if not any(k.startswith(root + "sam_model.") for k in keys):
            raise CheckpointError(f"{path}: no model.sam_model.* tensors; not a DeepSeek-OCR checkpoint")
        used: set[str] = set()
        groups = (
            ("sam_model.", sam, "sam", ()),
            ("vision_model.", clip, "clip", ("embeddings.position_ids",)),
            ("projector.layers.", projector, "projector", ()),
        )
        for sub, module, name, ignore in groups:
            prefix = root + sub
            mine = [k for k in keys if k.startswith(prefix)]
            if module is None:
                continue
            used.update(mine)
            part = load_into(module, {k[len(prefix):]: reader.get(k) for k in mine}, name, ignore_prefixes=ignore)
            report.loaded += [prefix + k for k in part.loaded]
            report.ignored += [prefix + k for k in part.ignored]
        singles = (
            ("image_newline", ("image_newline",), newline_param),
            ("view_seperator", ("view_seperator", "view_separator"), separator_param),
        )
        for name, spellings, param in singles:
            if param is None:
                continue
            found = [root + s for s in spellings if root + s in keys]
            if not found:
                raise CheckpointError(f"deepseek-ocr vision: missing key {root + name}")
            tensor = reader.get(found[0])
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"deepseek-ocr vision: shape mismatch {found[0]}: checkpoint {tuple(tensor.shape)} "
                    f"vs model {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
            used.add(found[0])
            report.loaded.append(found[0])
        report.ignored += [k for k in keys if k not in used]
    log.info(report.summary())
    return report


# ---------------------------------------------------------------------------------------
# Our own checkpoint directories and nanochat checkpoints
# ---------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "nano-deepseek-ocr/1"
MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE, OPTIMIZER_FILE = (
    "model.safetensors", "config.json", "tokenizer.json", "optimizer.pt")


def save_checkpoint(directory: str | Path, model: "torch.nn.Module", *, tokenizer=None,
                    optimizer_state: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``, ``optimizer.pt``).

    Weights round-trip bit-exactly. The optimizer state is our own file, written with
    torch.save and read back with ``weights_only=True`` (no arbitrary unpickling).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / MODEL_FILE), metadata={"format": CHECKPOINT_FORMAT})
    meta = {"format": CHECKPOINT_FORMAT, "model": model.config.to_dict(), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save(directory)
    if optimizer_state is not None:
        torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    return directory


def read_checkpoint_config(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    with_tokenizer: bool = True):
    """(model, tokenizer or None, meta) from a directory written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    from model.config import VLMConfig
    from model.vlm import NanoDeepseekOCR

    directory = Path(directory)
    meta = read_checkpoint_config(directory)
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {MODEL_FILE} is missing")
    config = VLMConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = NanoDeepseekOCR(config)
    model = model.to_empty(device=device)
    load_into(model, load_file(str(weights), device=str(device)), "checkpoint")
    model.gpt.init_rotary()
    tokenizer = None
    if with_tokenizer and (directory / TOKENIZER_FILE).is_file():
        from model.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(directory / TOKENIZER_FILE)
    return model, tokenizer, meta


def load_optimizer_state(directory: str | Path) -> dict | None:
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


_NANOCHAT_MODEL = re.compile(r"model_(\d{6})\.pt$")


def load_nanochat(directory: str | Path, step: int | None = None, *, device: str = "cpu"):
    """A nanochat base/SFT checkpoint (``model_{step:06d}.pt`` + ``meta_{step:06d}.json``) as our GPT.

    The latest step is taken when ``step`` is None. ``_orig_mod.`` (torch.compile) prefixes are
    stripped and the state dict must match exactly.
    """
    from model.config import GPTConfig
    from model.gpt import GPT

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"nanochat checkpoint directory {directory} does not exist")
    steps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _NANOCHAT_MODEL.match(p.name)))
    if not steps:
        raise CheckpointError(f"{directory}: no model_XXXXXX.pt files (nanochat layout)")
    step = steps[-1] if step is None else step
    model_path, meta_path = directory / f"model_{step:06d}.pt", directory / f"meta_{step:06d}.json"
    if not model_path.is_file():
        raise CheckpointError(f"{directory}: no checkpoint for step {step} (have {steps})")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: nanochat keeps the model config there")
    meta = json.loads(meta_path.read_text())
    if "model_config" not in meta:
        raise CheckpointError(f"{meta_path} has no 'model_config'")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in meta["model_config"].items() if k in known})
    state = torch.load(model_path, map_location=device, weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    model = GPT(config).to(device)
    load_into(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, "nanochat")
    return model, meta
