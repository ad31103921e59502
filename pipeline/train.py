"""Both training stages on Ray Train: the per-worker loop and the ``TorchTrainer`` around it.

Stage 1 trains everything on vision data. Stage 2 starts from a stage-1 checkpoint, freezes
SAM + neck + compressor and trains on a vision/text mixture. Each worker streams its shard of
the Parquet dataset, packs samples into fixed-length sequences, and steps with gradient
accumulation, clipping and DDP, or FSDP2 sharded per block (``strategy: fsdp``, see
``pipeline.distributed``); bf16 autocast on GPU. Checkpoints go through
``ray.train.report`` so a restarted worker group resumes from the latest one. Rank 0 logs to
the MLflow run that the driver created (RAY_NOTES: never let workers create runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from model.config import MODES, VLMConfig, from_yaml, preset as model_preset
from model.flops import packed_train_flops
from model.vlm import VISION_COMPILE_UNITS, ImageViews, NanoDeepseekOCR
from pipeline.distributed import (any_rank, full_model_state, full_optimizer_state, full_value, is_sharded,
                                  shard_model, shard_optimizer_state, vision_on_every_rank)
from pipeline.glyph_loss import ATTRIBUTE as GLYPH_HEADS, CELL_TARGETS
from pipeline.grad_norms import parameters_by_part, part_grad_norms, part_weight_norms
from pipeline.mixture import Sample, batches, mixture_counts
from pipeline.optim import SCHEDULES, build_optimizer, lr_multiplier, set_lr
from pipeline.prefetch import Prefetcher
from pipeline.profiling import StepProfiler, phase
from pipeline.spike_guard import SpikeGuard
from pipeline.startup import StartupClock
from pipeline.step_meter import StepMeter
from pipeline.synth_stream import SynthStreamConfig

PENDING_RUN_FILE = "ndocr_pending_run.json"  # beside Ray's run state while a time-limited stage is unfinished
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16


@dataclass
class TrainConfig:
    """Everything a stage needs; YAML files under ``jobs/configs/`` set these fields."""

    stage: int = 1
    preset: str = "tiny"
    data: list[str] = field(default_factory=lambda: ["artifacts/shards"])
    synth: SynthStreamConfig | dict | None = None  # stage 1: train on pages rendered on the fly instead of data
    tokenizer: str | None = None  # default: tokenizer.json beside the first shard directory
    out: str = "artifacts/runs"  # Ray Train storage_path (local or s3://)
    run_name: str | None = None
    experiment: str = "nano-deepseek-ocr"
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    num_workers: int = 1
    use_gpu: bool = False
    strategy: str = "ddp"  # ddp | fsdp (FSDP2, one shard group per block; checkpoints load with either)
    seq_len: int = 1024
    batch_size: int = 4  # packed rows per micro-step per worker
    max_row_megapixels: float | None = None  # cap on the views' pixels per packed row: even vision work per rank
    pack_lookahead: int = 1  # samples that may wait for a later row (1: greedy packing in arrival order)
    prefetch_batches: int = 2  # micro-batches prepared on a background thread (0: in the loop)
    grad_accum: int = 1
    steps: int = 100
    optimizer: str = "adamw"  # adamw | muon
    lr: float = 1e-3
    muon_lr: float = 0.02
    encoder_lr_scale: float = 1.0  # lr multiplier for SAM + CLIP (random-init encoders need < 1)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    schedule: str | None = None  # cosine | step | warmdown | constant (default: cosine stage 1, step stage 2)
    min_lr_frac: float = 0.1  # cosine and warmdown end here
    warmdown_frac: float = 0.4  # warmdown: the last share of the steps, where the lr falls linearly
    step_milestones: list[float] = field(default_factory=lambda: [0.6, 0.85])
    step_gamma: float = 0.3
    grad_clip: float = 1.0
    # > 1: skip the step (weights and optimizer states untouched) whose pre-clip grad norm is over
    # this many times the running mean of accepted steps', or not finite (pipeline.spike_guard); 0: off
    skip_spikes: float = 0.0
    skip_spikes_patience: int = 100  # that many skipped steps in a row end the run with an error (diverged)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    init_from: str | None = None  # weights only (stage 2 starts from stage 1)
    resume_from: str | None = None  # weights + optimizer + step
    text_ratio: float = 0.1  # stage 2 mixture
    shuffle: bool = True
    # Ray Data hands blocks over as they finish, so with several CPUs the order (and the run) varies
    # under one seed; True keeps it fixed (reproducible runs) at the cost of waiting for slow blocks
    preserve_order: bool = False
    cache_data_mb: int = 2048  # keep a worker's shard in memory after the first epoch when it fits
    seed: int = 0
    max_failures: int = 0
    log_every: int = 10  # steps between reports (loss, throughput): the only steps that wait for the GPU
    compile: bool = False
    compile_vision: bool = False  # torch.compile SAM + CLIP (view count dynamic): minutes to compile, faster steps
    # what compile_vision compiles as one graph: each "tower" whole, or each transformer "block" (far less
    # to compile: NanoDeepseekOCR.compile_vision)
    compile_vision_unit: str = "tower"
    compile_gpt: bool = False  # torch.compile each GPT block (GPT.compile_blocks): fused norms/RoPE/ReLU^2, less memory
    slot_centering: bool = False  # new models only: VLMConfig.slot_centering (encoders from random init)
    projector_input_norm: bool = False  # new models only: VLMConfig.projector_input_norm (likewise)
    glyph_loss: float = 0.0  # weight of the training-only glyph heads (pipeline.glyph_loss); synth stream only
    glyph_cell: str = "bag"  # the slots' glyph target: "bag" (a cell's characters) or "grid" (each patch's, in place)
    torch_threads: int | None = None  # CPU workers: default this node's cores / local workers
    sample_prediction: bool = True
    register_model: str | None = None  # a model-registry name (stage 2 default: nano-deepseek-ocr)
    export_dir: str | None = None  # where the final checkpoint is copied (default <out>/<run>/final)
    inject_failure_at_step: int | None = None  # testing: rank 0 dies once at this step
    # stop with a checkpoint after this long; the same run resumes. Several workers check the clock
    # together when they report (every log_every steps), one worker every step
    time_limit_s: float | None = None
    # stop with a checkpoint at this wall-clock time (time.time()), checked as time_limit_s is: a
    # deadline set from outside, e.g. a lent machine's call limit less what saving a checkpoint takes,
    # which time spent before the loop (data, compiling) cannot push past
    stop_at_unix_s: float | None = None
    # end the stage at this wall-clock time as if it had finished: the step it reached saves the final
    # checkpoint and the stage counts as done (``ended_early_at_step`` says so; the lr schedule stays
    # that of ``steps``). For a lease that must end with an evaluated model rather than a checkpoint to
    # resume; checked as stop_at_unix_s is, and it wins when both have passed
    end_at_unix_s: float | None = None
    profile_at: int | None = None  # torch.profiler over steps [profile_at, +profile_steps) on rank 0 (MLflow profile/)
    profile_steps: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        self.betas = tuple(self.betas)
        if self.schedule is None:
            self.schedule = "cosine" if self.stage == 1 else "step"
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 < self.warmdown_frac <= 1:
            raise ValueError(f"warmdown_frac must be in (0, 1], got {self.warmdown_frac}")
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.stage == 2 and not (self.init_from or self.resume_from):
            raise ValueError("stage 2 starts from a stage-1 checkpoint: set init_from (or resume_from)")
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.log_every < 1:
            raise ValueError("steps, batch_size, grad_accum and log_every must be >= 1")
        if self.profile_at is not None and not (0 <= self.profile_at and 1 <= self.profile_steps
                                                and self.profile_at + self.profile_steps <= self.steps):
            raise ValueError(f"profile_at {self.profile_at} with profile_steps {self.profile_steps}: the profiled "
                             f"steps must lie within the run's {self.steps} steps")
        if self.pack_lookahead < 1 or self.prefetch_batches < 0:
            raise ValueError("pack_lookahead must be >= 1 and prefetch_batches >= 0")
        if self.compile and self.compile_gpt:
            raise ValueError("compile already compiles the whole model; compile_gpt compiles only the GPT blocks: "
                             "choose one")
        if self.skip_spikes and self.skip_spikes <= 1:
            raise ValueError(f"skip_spikes must be 0 (off) or > 1 (a multiple of the running grad norm), "
                             f"got {self.skip_spikes}")
        if self.skip_spikes_patience < 1:
            raise ValueError(f"skip_spikes_patience must be >= 1, got {self.skip_spikes_patience}")
        if self.compile_vision_unit not in VISION_COMPILE_UNITS:
            raise ValueError(f"compile_vision_unit must be one of {', '.join(VISION_COMPILE_UNITS)}, "
                             f"got {self.compile_vision_unit!r}")
        if self.max_row_megapixels is not None and self.max_row_megapixels <= 0:
            raise ValueError(f"max_row_megapixels must be > 0, got {self.max_row_megapixels}")
        if self.run_name is None:
            self.run_name = f"stage{self.stage}-{self.preset}"
        if isinstance(self.synth, dict):
            self.synth = SynthStreamConfig(**self.synth)
        if self.synth is not None and self.stage != 1:
            raise ValueError("synth (a stream of rendered pages) is for stage 1; stage 2 reads shards (data)")
        self._check_glyph_loss()

    def _check_glyph_loss(self) -> None:
        if self.glyph_loss < 0:
            raise ValueError(f"glyph_loss must be >= 0, got {self.glyph_loss}")
        if self.glyph_cell not in CELL_TARGETS:
            raise ValueError(f"glyph_cell must be one of {', '.join(CELL_TARGETS)}, got {self.glyph_cell!r}")
        if not self.glyph_loss:
            return
        if self.synth is None:
            raise ValueError("glyph_loss needs to know where each character lies: train on the synth stream")
        if MODES[self.synth.mode]["crop_mode"]:
            raise ValueError(f"glyph_loss reads the global view only: synth.mode {self.synth.mode!r} has tiles; "
                             "use tiny, small, base or large")
        if self.compile:
            raise ValueError("glyph_loss is not supported under compile (the whole model): use compile_vision, "
                             "which compiles the towers with the heads' hooks traced in")
        if self.strategy == "fsdp" and self.num_workers > 1:
            raise ValueError("glyph_loss runs its heads outside the model's forward, which FSDP2 does not gather: "
                             "use strategy ddp")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or str(Path(self.data[0]) / "tokenizer.json")

    @property
    def final_dir(self) -> str:
        from pipeline import storage

        return self.export_dir or storage.join(self.out, self.run_name, "final")


def load_train_config(path: str | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a YAML file plus overrides (``None`` overrides are ignored)."""
    return from_yaml(TrainConfig, path, "training", **overrides)


# ------------------------------------------------------------------ worker side

def row_to_sample(row: dict) -> Sample:
    """A shard row (see ``pipeline.preprocess``) as a training sample, with the glyphs of a
    synthetic-stream row that carries them."""
    from pipeline.glyphs import decode_glyphs
    from pipeline.preprocess import decode_row
    from pipeline.synth_stream import GLYPHS_COLUMN

    r = decode_row(row, copy=False)  # ImageViews.from_arrays copies the views into channels-first tensors
    images = []
    if r.get("global_view") is not None:
        images.append(ImageViews.from_arrays(r["global_view"], r.get("tiles"), r.get("spatial_crop") or (1, 1)))
    glyphs = row.get(GLYPHS_COLUMN)
    return Sample(np.asarray(r["input_ids"]), np.asarray(r["loss_mask"]), images, r.get("task", ""),
                  decode_glyphs(glyphs) if glyphs is not None and images else None)


def iter_shard_rows(shard) -> Iterator[dict]:
    """A dataset shard's rows as dicts, the view columns as zero-copy uint8 arrays over Ray's blocks.

    Why: ``iter_rows`` copies every 3 MB view into a Python ``bytes`` that :func:`row_to_sample`
    then copies again into a channels-first tensor; a tier-2 step reads ~50 of them on the
    trainer's data thread (``bench/trainer_input.py``). Other columns come as Python values.
    """
    from pipeline.preprocess import VIEW_COLUMNS, binary_views

    for table in shard.iter_batches(batch_size=None, batch_format="pyarrow"):
        columns = {name: (binary_views(table.column(name)) if name in VIEW_COLUMNS
                          else table.column(name).to_pylist()) for name in table.column_names}
        for i in range(table.num_rows):
            yield {name: values[i] for name, values in columns.items()}


def _sample_bytes(sample: Sample) -> int:
    return sample.input_ids.nbytes + sum(im.global_view.numel() + im.tiles.numel() for im in sample.images)


def _samples(shard, seed: int, cache_mb: int = 0) -> Iterator[Sample]:
    """Endless samples from the worker's shard, epoch after epoch.

    Every epoch re-executes the Ray Data pipeline (read, filter, shuffle, split), which costs
    more than a step when the data is small. So the first epoch's samples are kept in memory
    while they fit in ``cache_mb`` and later epochs replay them in a fresh seeded order;
    larger shards keep streaming.
    """
    cache: list[Sample] | None = [] if cache_mb > 0 else None
    budget = cache_mb * 2**20
    used = 0
    n = 0
    for row in iter_shard_rows(shard):
        sample = row_to_sample(row)
        n += 1
        if cache is not None:
            used += _sample_bytes(sample)
            if used <= budget:
                cache.append(sample)
            else:
                cache = None  # too big to keep: stream every epoch
        yield sample
    if n == 0:
        raise RuntimeError("this worker's dataset shard is empty: fewer rows than workers?")
    epoch = 1
    while True:
        if cache is not None:
            order = np.random.default_rng(seed + epoch).permutation(len(cache))
            yield from (cache[i] for i in order)
        else:
            for row in iter_shard_rows(shard):
                yield row_to_sample(row)
        epoch += 1


def _build_model(cfg: TrainConfig, tokenizer) -> NanoDeepseekOCR:
    config = model_preset(cfg.preset)
    config.gpt.vocab_size = tokenizer.vocab_size
    config.gpt.sequence_len = max(config.gpt.sequence_len, cfg.seq_len)
    config.image_token_id = tokenizer.token_id("<image>")
    config.slot_centering = cfg.slot_centering
    config.projector_input_norm = cfg.projector_input_norm
    torch.manual_seed(cfg.seed)
    model = NanoDeepseekOCR(config)
    model.init_weights()
    return model


def _local_file(path: str) -> str:
    """A local copy of a file that may live on S3 (the tokenizer beside remote shards)."""
    from pipeline import storage

    if not storage.is_remote(path):
        return path
    local = Path(tempfile.mkdtemp(prefix="ndocr-")) / Path(path).name
    local.write_bytes(storage.read_bytes(path))
    return str(local)


def _unwrap(model: torch.nn.Module) -> NanoDeepseekOCR:
    """The model under DDP's ``.module`` and torch.compile's ``._orig_mod`` (FSDP2 wraps nothing)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def _full_state_and_optim(model, optimizer, rank: int) -> tuple[dict | None, dict | None]:
    """Model and optimizer state for a checkpoint, in the one-GPU layout whatever the strategy.

    Under FSDP2 every rank takes part in gathering the shards and only rank 0 gets them (the
    others get None, None), so an FSDP checkpoint resumes under DDP or on one GPU.
    """
    inner = _unwrap(model)
    if is_sharded(inner):
        state = full_model_state(inner)
        optim = [full_optimizer_state(o.state_dict(), keep=rank == 0) for o in optimizer.optimizers]
        return (state, {"optimizers": optim}) if rank == 0 else (None, None)
    return inner.state_dict(), optimizer.state_dict()


def _load_optimizer(optimizer, state: dict, sharded: bool) -> None:
    """Load a checkpoint's (one-GPU layout) optimizer state, cut to this rank's shards under FSDP2."""
    if sharded:
        saved = state["optimizers"]
        if len(saved) != len(optimizer.optimizers):
            raise ValueError(f"optimizer state has {len(saved)} parts, this optimizer {len(optimizer.optimizers)}")
        state = {"optimizers": [shard_optimizer_state(o, s) for o, s in zip(optimizer.optimizers, saved)]}
    optimizer.load_state_dict(state)


def _plain_copy(model: NanoDeepseekOCR, state: dict[str, torch.Tensor], device: torch.device) -> NanoDeepseekOCR:
    """An unsharded model from a full state dict (rank 0's sample prediction after FSDP: a
    sharded model would wait for the other ranks in every forward)."""
    from model.weights import load_into

    from pipeline.glyph_loss import split_state

    with torch.device("meta"):
        copy = NanoDeepseekOCR(model.config)
    copy = copy.to_empty(device=device)
    load_into(copy, split_state(state)[0], "gathered FSDP state")
    copy.gpt.init_rotary()
    return copy


def _save(cfg: TrainConfig, model, optimizer, tokenizer, step: int, mode: str | None, rank: int,
          spike_guard: SpikeGuard | None = None) -> str | None:
    """Write a checkpoint on rank 0 and return its directory (None on other ranks).

    Every rank must call it: under FSDP2 gathering the state is a collective.
    """
    from model.weights import save_checkpoint
    from pipeline.glyph_loss import STATE_FILE, split_state

    state, optim = _full_state_and_optim(model, optimizer, rank)
    if rank != 0:
        return None
    directory = tempfile.mkdtemp(prefix="ckpt-")
    inner = _unwrap(model)
    state, heads = split_state(state)  # training-only heads: beside the weights, for a resume
    if heads:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, str(Path(directory) / STATE_FILE))

    class _View(torch.nn.Module):  # save_checkpoint wants .config and .state_dict()
        def __init__(self):
            super().__init__()
            self.config = inner.config

        def state_dict(self, *a, **k):
            return state

    save_checkpoint(directory, _View(), tokenizer=tokenizer,
                    optimizer_state={"optimizer": optim, "step": step,
                                     **({"spike_guard": spike_guard.state_dict()} if spike_guard else {})},
                    extra={"processor": {"mode": mode}, "step": step, "stage": cfg.stage,
                           "train": dataclasses.asdict(cfg)})
    return directory


def _restore(cfg: TrainConfig, tokenizer, device) -> tuple[NanoDeepseekOCR, dict | None, int, str | None]:
    """Model (+ optimizer state, step) from Ray's latest checkpoint, resume_from, init_from or scratch."""
    import ray.train

    from pipeline import storage

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # read in place when the run's storage is local; a remote one is downloaded and the copy
        # removed afterwards (to_directory() left a full checkpoint in /tmp on every resume)
        with checkpoint.as_directory() as source:
            return _load(cfg, tokenizer, device, source, resume=True)
    if cfg.resume_from:
        return _load(cfg, tokenizer, device, storage.localize_dir(cfg.resume_from), resume=True)
    if cfg.init_from:
        return _load(cfg, tokenizer, device, storage.localize_dir(cfg.init_from), resume=False)
    return _with_glyph_heads(cfg, _build_model(cfg, tokenizer), None).to(device), None, 0, None


def _load(cfg: TrainConfig, tokenizer, device, source: str,
          resume: bool) -> tuple[NanoDeepseekOCR, dict | None, int, str | None]:
    """Model (+ optimizer state and step when resuming) from the checkpoint directory ``source``."""
    from model.weights import load_checkpoint, load_optimizer_state

    model, _, meta = load_checkpoint(source, device=device, with_tokenizer=False)
    if model.config.gpt.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"checkpoint {source} has vocab {model.config.gpt.vocab_size} but the tokenizer "
                         f"{cfg.tokenizer_path} has {tokenizer.vocab_size}")
    warn_config_ignored(cfg, model.config, source)
    model = _with_glyph_heads(cfg, model, source if resume else None).to(device)
    mode = (meta.get("processor") or {}).get("mode")
    if not resume:
        return model, None, 0, mode
    state = load_optimizer_state(source)
    return model, state, int(meta.get("step", 0)), mode


def _with_glyph_heads(cfg: TrainConfig, model: NanoDeepseekOCR, resume_dir: str | None) -> NanoDeepseekOCR:
    """The model with its training-only glyph heads when ``cfg.glyph_loss`` asks for them, their
    weights restored from a checkpoint being resumed."""
    from pipeline.glyph_loss import STATE_FILE, GlyphHeads

    if not cfg.glyph_loss:
        return model
    heads = GlyphHeads(model.config, cfg.glyph_cell)
    saved = Path(resume_dir) / STATE_FILE if resume_dir else None
    if saved is not None and saved.is_file():
        from safetensors.torch import load_file

        state = load_file(str(saved))
        saved_cell = state.get("cell.weight")
        if saved_cell is not None and saved_cell.shape != heads.cell.weight.shape:
            raise ValueError(f"{saved}: its cell head was trained for another glyph_cell target than "
                             f"{cfg.glyph_cell!r} (weight {tuple(saved_cell.shape)}, this one "
                             f"{tuple(heads.cell.weight.shape)}): resume with the glyph_cell it was trained with")
        heads.load_state_dict(state)
    elif saved is not None:
        warnings.warn(f"resuming from {resume_dir} without {STATE_FILE}: the glyph heads start afresh", stacklevel=2)
    setattr(model, GLYPH_HEADS, heads)
    return model


def warn_config_ignored(cfg: TrainConfig, loaded: VLMConfig, source: Any) -> None:
    """Warn when the run's config asks for slot centering or the projector's input norm and a loaded
    checkpoint was trained without it.

    Both are part of the network the weights were trained as, so a checkpoint keeps its own: a
    YAML's ``slot_centering: true`` over such a checkpoint (DeepSeek-OCR's weights, say) would
    otherwise be ignored in silence. A config left at the default (false) over a checkpoint that
    has one is the normal stage-2 case and says nothing.
    """
    for name in ("slot_centering", "projector_input_norm"):
        if getattr(cfg, name) and not getattr(loaded, name):
            warnings.warn(f"the config sets {name}: true, but checkpoint {source} was trained without it "
                          f"and keeps it off", stacklevel=2)


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class _Tracker:
    """Rank 0's MLflow logging into the run the driver created."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, rank: int) -> None:
        self.active = bool(run_id) and rank == 0
        self.run_id = run_id
        self.uri = tracking_uri
        self.pending: dict[int, dict[str, float]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from pipeline import tracking

        tracking.log_metrics(self.run_id, metrics, step=step, tracking_uri=self.uri)

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        from pipeline import tracking

        tracking.log_artifact(self.run_id, path, artifact_path=artifact_path, tracking_uri=self.uri)


# Ray Train 2.60 patches `print` in its workers to tee each line into its logger as well, and since
# Ray's workers wrap stdout, every progress line reached the driver twice. Plain print: once.
WORKER_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def train_loop_per_worker(loop_config: dict) -> dict:
    """The Ray Train worker function (also callable directly in one process for debugging)."""
    import ray.train
    import ray.train.torch

    from model.tokenizer import Tokenizer

    clock = StartupClock(loop_config.get("submitted_unix_s"))
    cfg = TrainConfig(**loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cpu":  # Ray pins workers to one thread (OMP_NUM_THREADS=1); use this node's share
        torch.set_num_threads(cfg.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    tokenizer = Tokenizer.load(_local_file(cfg.tokenizer_path))
    model, optim_state, start_step, ckpt_mode = _restore(cfg, tokenizer, device)
    mode = loop_config.get("mode") or ckpt_mode
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # bypassed by SAM features
    if cfg.stage == 2:
        model.freeze_stage2()
    model.train()
    fsdp = cfg.strategy == "fsdp" and world > 1  # one worker: nothing to shard, plain model
    if fsdp:
        model = shard_model(model, device)
    elif world > 1:
        # device_ids=None: DDP then leaves forward inputs where they are. With a device it moves them
        # all, and the ids, positions and segment ids that the trainer keeps on the host (so that the
        # model reads counts and boundaries there without a sync) would go to the GPU first.
        kwargs = {"device_ids": None, "output_device": None}
        if cfg.stage == 2:
            kwargs["find_unused_parameters"] = True
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=kwargs)
    else:
        model = model.to(device)
    inner = _unwrap(model)
    glyph_heads = getattr(inner, GLYPH_HEADS, None) if cfg.glyph_loss else None
    if glyph_heads is not None:
        glyph_heads.attach(inner)
    if cfg.compile_vision:
        # one graph per view size for any number of views: on an H200 the full preset's vision towers
        # run 1.6x faster (a step 1.34x), after ~1.5-2 min of compiling per view size
        inner.compile_vision(0, unit=cfg.compile_vision_unit)
    if cfg.compile_gpt:
        inner.gpt.compile_blocks()
    if cfg.compile:
        model = torch.compile(model)
    grad_parts = parameters_by_part(inner)
    # a skipped step is decided on the device: fused AdamW (CPU too) reads the decision there
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.muon_lr,
                                cfg.encoder_lr_scale, fused=True if cfg.skip_spikes else None)
    spike_guard = SpikeGuard(cfg.skip_spikes) if cfg.skip_spikes else None
    if spike_guard and optim_state is not None and "spike_guard" in optim_state:  # a resumed run keeps its bar
        spike_guard.load_state_dict(optim_state["spike_guard"], device)
    if optim_state is not None:
        _load_optimizer(optimizer, optim_state["optimizer"], fsdp)
        start_step = int(optim_state.get("step", start_step))
    tracker = _Tracker(loop_config.get("run_id"), loop_config.get("tracking_uri"), rank)
    clock.mark("model")

    shard = ray.train.get_dataset_shard("train")
    max_pixels = int(cfg.max_row_megapixels * 1e6) if cfg.max_row_megapixels else None
    stream = batches(_samples(shard, cfg.seed, 0 if cfg.synth else cfg.cache_data_mb), cfg.seq_len, cfg.batch_size,
                     max_pixels, cfg.pack_lookahead)
    if cfg.synth is None:
        for _ in range(start_step * cfg.grad_accum):  # resume: skip what the finished steps consumed
            next(stream)
    elif start_step and rank == 0:  # a fresh pass of rendered pages; skipping would re-render them
        print(f"resumed at step {start_step}: the synthetic stream (seed {cfg.synth.seed}) starts a new pass",
              flush=True)
    if cfg.prefetch_batches:
        # the first batch on this thread: whatever the data path initialises lazily (imports, Ray
        # Data's iterator, environment variables) happens here, not beside running CUDA kernels
        first = next(stream)
        clock.mark("first_batch")
        stream = Prefetcher(itertools.chain([first], stream), cfg.prefetch_batches,
                            prepare=(lambda b: b.pin_memory()) if device.type == "cuda" else None)
    peak = _peak_flops(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    profiler = StepProfiler(cfg.profile_at if rank == 0 else None, cfg.profile_steps, device)
    try:
        first_sample = None
        metrics: dict[str, float] = {}
        step = start_step
        meter = StepMeter(world)
        grad_norm_max = None  # the largest pre-clip norm since the last report: how often a step spikes
        t_start = time.perf_counter()
        while step < cfg.steps:
            if cfg.inject_failure_at_step == step and rank == 0:
                marker = Path(loop_config["fault_marker"])
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(f"worker died at step {step}\n")
                    print(f"[fault injection] rank 0 dies at step {step}", flush=True)
                    time.sleep(10)  # a crash mid-step: the controller has collected the last report
                    os._exit(1)
            profiler.before(step)
            lr = set_lr(optimizer, lr_multiplier(step, cfg.steps, cfg.schedule, cfg.warmup_steps, cfg.min_lr_frac,
                                                 cfg.step_milestones, cfg.step_gamma, cfg.warmdown_frac))
            t_data = time.perf_counter()
            with phase("data"):
                micro = [next(stream) for _ in range(cfg.grad_accum)]
            data_wait = time.perf_counter() - t_data
            if first_sample is None:  # this call's first step
                first_sample = micro[0]
                clock.mark("first_batch")  # here when nothing prefetched it
            n_targets = max(1, sum(b.n_target_tokens for b in micro))
            loss_sum = torch.zeros((), device=device)  # stays on the device until a step reports
            glyph_sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(micro):
                with phase("to_device"):  # ids stay on the host: the forward reads counts there without a sync
                    batch = batch.to(device, index_on_host=True)
                if fsdp and cfg.stage == 2:  # stage 1 rows all carry an image; stage 2 mixes in text rows
                    batch = vision_on_every_rank(batch, inner, device)
                # DDP skips the all-reduce on all but the last micro-step. FSDP2 (no no_sync)
                # reduce-scatters every micro-step: skipping would keep unsharded gradients alive
                # across micro-steps and give back the memory that sharding saves.
                sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
                ctx_sync = model.no_sync() if not sync else contextlib.nullcontext()
                with ctx_sync, autocast:
                    with phase("forward"):
                        loss = model(batch.input_ids, batch.images, batch.targets, positions=batch.positions,
                                     segment_ids=batch.segment_ids, loss_reduction="sum")
                    total = loss / n_targets
                    if glyph_heads is not None:
                        with phase("glyph_loss"):
                            glyph, parts = glyph_heads.loss(batch.glyphs)
                        total = total + cfg.glyph_loss * glyph / len(micro)
                        for k, v in parts.items():
                            glyph_sums[k] = glyph_sums.get(k, 0.0) + v / len(micro)
                with phase("backward"):
                    total.backward()
                loss_sum += loss.detach().float()
            with phase("optimizer"):
                # by part, on the steps that will report (a time-limit stop may report without them)
                part_norms = part_grad_norms(grad_parts) if _reports_at(cfg, step + 1) else {}
                if part_norms:  # and the weights the step starts from
                    part_norms.update(part_weight_norms(grad_parts))
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                           cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                grad_norm = full_value(grad_norm)  # FSDP2: a DTensor, made whole on the device (no host sync)
                optimizer.step(skip=spike_guard.check(grad_norm) if spike_guard else None)
                optimizer.zero_grad(set_to_none=True)
                grad_norm_max = grad_norm if grad_norm_max is None else torch.maximum(grad_norm_max, grad_norm)
            try:
                profiled = profiler.after(step)
            except Exception as exc:  # a profile must never fail a run
                print(f"profile of steps {profiler.start}..{step} skipped: {exc!r}", flush=True)
                profiled = None
            if profiled is not None:
                print(f"profile of steps {profiler.start}..{step}:\n{profiler.summary.report}", flush=True)
                try:
                    tracker.artifact(str(profiled), "profile")
                finally:
                    shutil.rmtree(profiled, ignore_errors=True)
                tracker.log(profiler.summary.metrics(), step + 1)
            step += 1
            if not clock.done("first_step"):  # this call's first step, compiling included
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # once: the step's kernels, not just their launch
                clock.mark("first_step")
                if rank == 0:
                    print(f"stage{cfg.stage} startup: {clock.text()}", flush=True)
                tracker.log(clock.metrics(), step)
            # the vision towers are most of a step's work: the FLOPs count its views as well as its tokens
            meter.add(sum(b.input_ids.numel() for b in micro), sum(b.n_samples for b in micro), data_wait,
                      sum(packed_train_flops(inner.config, b.images, b.segment_ids) for b in micro))
            checkpoint_due = _checkpoints_at(cfg, step)
            report_due = _reports_at(cfg, step)
            # one GPU checks the clock every step; several agree on it (a collective) only when they report
            clock_due = step < cfg.steps and (world == 1 or report_due)
            ends_now = (clock_due and cfg.end_at_unix_s is not None
                        and any_rank(time.time() >= cfg.end_at_unix_s, device))
            out_of_time = (clock_due and not ends_now and _has_deadline(cfg)
                           and any_rank(_past_deadline(cfg, t_start), device))
            if report_due or out_of_time or ends_now:  # the only host syncs of a step
                metrics = {"lr": lr, "step": step,
                           **meter.read({"loss": loss_sum / n_targets, "grad_norm": grad_norm,
                                         "grad_norm_max": grad_norm_max, **part_norms, **glyph_sums,
                                         **({"skipped_steps": spike_guard.skipped} if spike_guard else {})})}
                grad_norm_max = None
                if ends_now:  # logged too: the run's record says its schedule was cut short
                    metrics["ended_early_at_step"] = float(step)
                if peak:  # vision + GPT (model.flops); before session 25 the GPT's alone
                    metrics["mfu"] = metrics.get("flops_per_s", 0.0) / (peak * world)
                if device.type == "cuda":
                    metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                if rank == 0:
                    print(f"stage{cfg.stage} step {step}/{cfg.steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                          f"grad_norm {metrics['grad_norm']:.3f} tok/s {metrics['tokens_per_s']:.0f}", flush=True)
                tracker.log({k: v for k, v in metrics.items() if k != "step"}, step)
                if spike_guard:  # every rank holds the same all-reduced norms, so all stop together
                    spike_guard.raise_if_stuck(cfg.skip_spikes_patience, step)
            if out_of_time:
                metrics["stopped_at_time_limit"] = 1.0
                if rank == 0:
                    print(f"out of time at step {step}/{cfg.steps} ({_deadline_text(cfg)}): checkpointing; "
                          "run the same stage again to resume", flush=True)
            if ends_now and rank == 0:
                print(f"end time reached at step {step}/{cfg.steps} "
                      f"({time.strftime('%H:%M:%S', time.localtime(cfg.end_at_unix_s))}): the stage ends here "
                      "as finished, with its lr schedule cut short", flush=True)
            if checkpoint_due or out_of_time or ends_now:
                directory = _save(cfg, model, optimizer, tokenizer, step, mode, rank, spike_guard)
                checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
                ray.train.report(metrics, checkpoint=checkpoint)
                if directory:
                    shutil.rmtree(directory, ignore_errors=True)
            if out_of_time:
                return metrics
            if ends_now:
                break
        if cfg.sample_prediction and first_sample is not None and loop_config.get("run_id"):
            state = full_model_state(inner) if fsdp else None  # every rank helps gather; rank 0 predicts
            if rank == 0:
                try:
                    predictor = inner if state is None else _plain_copy(inner, state, device)
                    _log_sample_prediction(predictor, tokenizer, first_sample, tracker)
                except Exception as exc:  # a picture must never fail a finished run
                    print(f"sample prediction skipped: {exc}", flush=True)
        return metrics
    finally:
        profiler.close()
        if isinstance(stream, Prefetcher):
            stream.close()


def _checkpoints_at(cfg: TrainConfig, step: int) -> bool:
    """Whether the step that ends at ``step`` (counted from 1) saves a checkpoint (the last does)."""
    return step == cfg.steps or bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)


def _has_deadline(cfg: TrainConfig) -> bool:
    return cfg.time_limit_s is not None or cfg.stop_at_unix_s is not None


def _past_deadline(cfg: TrainConfig, t_start: float) -> bool:
    """Whether the stage is out of time: ``time_limit_s`` after the loop began (``t_start``, a
    perf_counter reading) or past the wall-clock ``stop_at_unix_s``."""
    return ((cfg.time_limit_s is not None and time.perf_counter() - t_start >= cfg.time_limit_s)
            or (cfg.stop_at_unix_s is not None and time.time() >= cfg.stop_at_unix_s))


def _deadline_text(cfg: TrainConfig) -> str:
    parts = [f"time limit {cfg.time_limit_s:.0f} s"] if cfg.time_limit_s is not None else []
    if cfg.stop_at_unix_s is not None:
        parts.append(f"stop at {time.strftime('%H:%M:%S', time.localtime(cfg.stop_at_unix_s))}")
    return ", ".join(parts)


def _reports_at(cfg: TrainConfig, step: int) -> bool:
    """Whether that step logs its metrics: every ``log_every`` and at each checkpoint (a stop at
    the time limit reports as well, unforeseen)."""
    return _checkpoints_at(cfg, step) or step % cfg.log_every == 0


def _prompt_text(tokenizer, ids: torch.Tensor, targets: torch.Tensor) -> str:
    """The prompt of the first packed sample, with runs of image slots folded back to <image>."""
    image_id = tokenizer.token_id("<image>")
    first_target = int((targets >= 0).nonzero()[0]) + 1 if (targets >= 0).any() else len(ids)
    prompt_ids, prev = [], None
    for t in ids[:first_target].tolist():
        if t == image_id and prev == image_id:
            continue
        prompt_ids.append(t)
        prev = t
    if prompt_ids and prompt_ids[0] == tokenizer.bos_id:
        prompt_ids = prompt_ids[1:]
    return tokenizer.decode(prompt_ids)


def _log_sample_prediction(model: NanoDeepseekOCR, tokenizer, batch, tracker: _Tracker) -> None:
    """Greedy OCR of the first training image, drawn with its boxes, as an MLflow artifact."""
    from PIL import Image

    from model.engine import Engine, GenerationRequest, SamplingParams
    from model.grounding import draw_boxes, parse_grounding

    if not batch.images:
        return
    model.eval()
    seg0 = batch.segment_ids[0] == 0
    prompt = _prompt_text(tokenizer, batch.input_ids[0][seg0].cpu(), batch.targets[0][seg0].cpu())
    image = batch.images[0]
    result = Engine(model, tokenizer, compile_encoder=False).generate(  # one page: a compile would cost more
        [GenerationRequest(prompt, [image], params=SamplingParams(max_new_tokens=256))])[0]
    page = Image.fromarray(image.global_view.permute(1, 2, 0).cpu().numpy())
    parsed = parse_grounding(result.text)
    drawn = draw_boxes(page, parsed.boxes)
    with tempfile.TemporaryDirectory() as tmp:
        drawn.save(Path(tmp) / "sample_prediction.png")
        (Path(tmp) / "sample_prediction.txt").write_text(result.text)
        tracker.artifact(str(Path(tmp) / "sample_prediction.png"), "samples")
        tracker.artifact(str(Path(tmp) / "sample_prediction.txt"), "samples")


# ------------------------------------------------------------------ driver side

@dataclass
class StageResult:
    checkpoint_dir: str
    metrics: dict[str, float]
    run_id: str | None
    model_version: str | None = None
    complete: bool = True  # False: stopped out of time (time_limit_s, stop_at_unix_s); run the stage again to resume


def _datasets(cfg: TrainConfig):
    """The training dataset: stage 1 vision rows (shards, or the synthetic stream); stage 2
    the vision/text mixture."""
    from ray.data.expressions import col

    from pipeline import storage
    from pipeline.preprocess import read_shards
    from pipeline.synth_stream import synth_dataset

    if cfg.synth is not None:  # rendered in order, page by page: already as random as a shuffle
        return synth_dataset(cfg.synth, storage.read_text(cfg.tokenizer_path), cfg.seq_len, glyphs=cfg.glyph_loss > 0)
    ds = None
    for path in cfg.data:
        part = read_shards(path)
        ds = part if ds is None else ds.union(part)
    # text rows carry no image; expressions filter whole Arrow blocks, not row by row in Python
    has_image = col("n_image_tokens") > 0
    if cfg.stage == 1:
        ds = ds.filter(expr=has_image)
    else:
        vision = ds.filter(expr=has_image).materialize()
        text = ds.filter(expr=(col("n_image_tokens") == 0) | col("n_image_tokens").is_null()).materialize()
        text_rows = text.count()
        n_vision, n_text = mixture_counts(vision.count(), text_rows, cfg.text_ratio)
        parts = [vision] if n_vision else []
        if n_text:
            repeats = -(-n_text // max(1, text_rows))
            texts = text.union(*([text] * (repeats - 1))) if repeats > 1 else text
            parts.append(texts.limit(n_text))
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    if cfg.shuffle:
        ds = ds.random_shuffle(seed=cfg.seed)
    return ds


def _data_config(cfg: TrainConfig):
    """Ray Train's ingest options: its defaults, with the rows in a fixed order when asked."""
    from ray.train import DataConfig

    if not cfg.preserve_order:
        return DataConfig()
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def _shard_stats(cfg: TrainConfig) -> dict:
    from pipeline import storage

    if cfg.synth is not None:
        return {"mode": cfg.synth.mode, "source": f"synth:{cfg.synth.profile}", "pages": cfg.synth.pages}
    stats = storage.join(cfg.data[0], "stats.json")
    return json.loads(storage.read_text(stats)) if storage.exists(stats) else {}


def _checkpoint_step(path: str) -> int:
    from pipeline import storage

    config = storage.join(path, "config.json")
    if not storage.exists(config):
        raise FileNotFoundError(f"resume_from {path}: no config.json there (not a checkpoint directory)")
    return int(json.loads(storage.read_text(config)).get("step", 0))


def run_stage(cfg: TrainConfig) -> StageResult:
    """Train one stage on the connected Ray cluster; returns the exported final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline import tracking

    from pipeline import storage

    # workers run in Ray's session directory: hand them absolute paths / canonical URIs
    absolute = lambda p: storage.normalize(p) if p else p  # noqa: E731
    cfg = dataclasses.replace(cfg, data=[absolute(d) for d in cfg.data], tokenizer=absolute(cfg.tokenizer_path),
                              out=absolute(cfg.out), init_from=absolute(cfg.init_from),
                              resume_from=absolute(cfg.resume_from), export_dir=absolute(cfg.final_dir))
    if cfg.stage == 2 and cfg.init_from and not storage.exists(cfg.init_from):
        raise FileNotFoundError(f"stage 2: init_from checkpoint {cfg.init_from} does not exist (run stage 1 first)")
    if not storage.exists(cfg.tokenizer_path):
        raise FileNotFoundError(f"tokenizer {cfg.tokenizer_path} not found: preprocess writes it beside the shards")
    uri = cfg.tracking_uri or tracking.tracking_uri()
    data_stats = _shard_stats(cfg)
    mode = data_stats.get("mode")
    storage_path = cfg.out  # absolute, or an s3:// URI (normalised above)
    pending = storage.join(storage_path, cfg.run_name, PENDING_RUN_FILE)  # a time-limited attempt to go on with
    previous = json.loads(storage.read_text(pending)) if storage.exists(pending) else {}
    run_id = previous.get("run_id")
    if cfg.synth is not None:  # a resumed run reads fresh pages, not the ones it trained on again
        resume_step = int(previous.get("step") or 0) or (_checkpoint_step(cfg.resume_from) if cfg.resume_from else 0)
        cfg = dataclasses.replace(cfg, synth=cfg.synth.for_resume(resume_step))
    if run_id and not tracking.run_exists(run_id, tracking_uri=uri):
        print(f"MLflow run {run_id} of the unfinished attempt is not in {uri}: logging to a new run", flush=True)
        run_id = None
    if run_id:
        tracking.client(uri).update_run(run_id, status="RUNNING")
        print(f"resuming stage {cfg.stage} run {cfg.run_name} (MLflow run {run_id}) from its latest checkpoint",
              flush=True)
    else:
        run_id = tracking.start_run(cfg.experiment, run_name=cfg.run_name,
                                    tags={"stage": str(cfg.stage), "preset": cfg.preset},
                                    parent_run_id=cfg.parent_run_id, tracking_uri=uri)
    params = {"train": dataclasses.asdict(cfg), "model": model_preset(cfg.preset).to_dict(),
              "git_commit": tracking.git_commit(), "mode": mode}
    if data_stats:
        params["data"] = {k: v for k, v in data_stats.items() if isinstance(v, (int, float, str))}
    if not (previous and previous.get("run_id") == run_id):
        tracking.log_params_flat(run_id, params, tracking_uri=uri)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": dataclasses.asdict(cfg), "run_id": run_id, "tracking_uri": uri, "mode": mode,
                           "submitted_unix_s": time.time(),
                           "fault_marker": str(Path(tempfile.gettempdir() if "://" in storage_path else storage_path)
                                               / cfg.run_name / "fault_injected")},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env=WORKER_RUNTIME_ENV),
        datasets={"train": _datasets(cfg)},
        dataset_config=_data_config(cfg),
    )
    try:
        result = trainer.fit()
    except Exception:
        tracking.end_run(run_id, status="FAILED", tracking_uri=uri)
        raise
    if result.checkpoint is None:
        tracking.end_run(run_id, status="FAILED", tracking_uri=uri)
        raise RuntimeError(f"stage {cfg.stage} finished without a checkpoint: {result.error}")
    metrics = dict(result.metrics or {})
    if metrics.get("stopped_at_time_limit"):
        storage.write_text(pending, json.dumps({"run_id": run_id, "step": metrics.get("step")}))
        tracking.end_run(run_id, status="KILLED", tracking_uri=uri)
        return StageResult(result.checkpoint.path, metrics, run_id, complete=False)
    if previous:
        storage.remove([pending])
    with tempfile.TemporaryDirectory(prefix="ndocr-final-") as local:
        result.checkpoint.to_directory(local)
        storage.upload_dir(local, cfg.final_dir)
        tracking.log_artifact(run_id, str(Path(local) / "config.json"), artifact_path="checkpoint", tracking_uri=uri)
        version = None
        name = cfg.register_model or ("nano-deepseek-ocr" if cfg.stage == 2 else None)
        if name:
            tracking.log_artifact(run_id, local, artifact_path="model", tracking_uri=uri)
            version = tracking.register_model(run_id, "model", name, tracking_uri=uri)
    tracking.end_run(run_id, status="FINISHED", tracking_uri=uri)
    return StageResult(storage.normalize(cfg.final_dir), metrics, run_id, version)
