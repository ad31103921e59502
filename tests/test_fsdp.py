"""FSDP2 training (``strategy: fsdp``) on CPU with gloo, tiny preset.

- One step under FSDP on 2 processes equals one plain step on the same two micro-batches
  (AdamW and Muon; a text-only micro-batch on one rank while the other has images, with SAM
  frozen as in stage 2), and the gathered optimizer state equals the plain one; a full
  optimizer state loaded into a freshly sharded model gives the same second step.
- Through Ray Train: 2 FSDP workers train with Muon, log a finite loss and a sample
  prediction, and write a checkpoint in the one-GPU layout; a 1-worker DDP run resumes from
  it, and 2 FSDP workers resume from that one, each to its target step.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from model.weights import load_checkpoint, load_optimizer_state
from pipeline.grad_norms import parameters_by_part, part_grad_norms, part_weight_norms
from pipeline.optim import build_optimizer
from pipeline.train import run_stage
import test_train
from test_train import _cfg

workspace = test_train.workspace  # the train tests' shards fixture (10 tiny pages), reused here

WORLD = 2
VOCAB = 256
IMAGE_ID = 3
IMAGE_SIZE = 128  # tiny SAM: one 2x2 compressed grid, 7 slots


def _model(seed: int = 0):
    from model.config import preset
    from model.vlm import NanoDeepseekOCR

    config = preset("tiny")
    config.gpt.vocab_size = VOCAB
    config.image_token_id = IMAGE_ID
    torch.manual_seed(seed)
    model = NanoDeepseekOCR(config)
    model.init_weights()
    with torch.no_grad():  # a non-zero head, so that every block gets a gradient at step 1
        torch.nn.init.normal_(model.gpt.lm_head.weight, std=0.02)
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # as the train loop does
    return model


def _batch(rank: int, step: int, with_images: bool):
    """Two packed rows of random tokens; each sample an image prompt when ``with_images``."""
    import numpy as np

    from model.vlm import ImageViews, slot_count
    from pipeline.mixture import Sample, collate

    rng = np.random.default_rng(1000 * step + rank)
    groups = []
    for _ in range(2):
        group = []
        for _ in range(2):
            text = rng.integers(IMAGE_ID + 1, VOCAB, size=int(rng.integers(20, 40)))
            images = []
            if with_images:
                text = np.concatenate([[1], [IMAGE_ID] * slot_count(IMAGE_SIZE // 64), text])
                pixels = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
                images = [ImageViews.from_arrays(pixels, None)]
            mask = np.ones(len(text), dtype=np.uint8)
            mask[: len(text) // 2] = 0
            group.append(Sample(text, mask, images))
        groups.append(group)
    return collate(groups, 128)


def _loss(model, batch) -> torch.Tensor:
    loss = model(batch.input_ids, batch.images, batch.targets, positions=batch.positions,
                 segment_ids=batch.segment_ids, loss_reduction="sum")
    return loss / max(1, batch.n_target_tokens)


def _plain_step(model, optimizer, batches, parts: dict | None = None) -> float:
    """What data parallelism computes: the mean over ranks of each rank's per-token loss.
    ``parts``: filled with the pre-clip gradient norm of each model part."""
    sum(_loss(model, b) for b in batches).div(len(batches)).backward()
    if parts is not None:
        by_part = parameters_by_part(model)
        parts.update({k: float(v) for k, v in {**part_grad_norms(by_part), **part_weight_norms(by_part)}.items()})
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _sharded_step(model, optimizer, batch, parts: dict | None = None, skip: torch.Tensor | None = None) -> float:
    from pipeline.distributed import to_float, vision_on_every_rank

    _loss(model, vision_on_every_rank(batch, model, torch.device("cpu"))).backward()
    if parts is not None:  # every rank: the sharded gradients' (weights') squares are summed over the ranks
        by_part = parameters_by_part(model)
        parts.update({k: to_float(v) for k, v in {**part_grad_norms(by_part), **part_weight_norms(by_part)}.items()})
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.5)
    optimizer.step(skip=skip)
    optimizer.zero_grad(set_to_none=True)
    return to_float(norm)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _optim_diff(full: dict, plain: dict) -> float:
    """Largest difference between two optimizer state dicts (one-GPU layout), any key."""
    worst = 0.0
    for f, p in zip(full["optimizers"], plain["optimizers"]):
        assert f["state"].keys() == p["state"].keys()
        for i in f["state"]:
            for k, v in f["state"][i].items():
                assert tuple(v.shape) == tuple(p["state"][i][k].shape), (i, k)
                worst = max(worst, float((v.float() - p["state"][i][k].float()).abs().max()))
    return worst


def _disk_round_trip(state: dict) -> dict:
    """``state`` as a checkpoint reads it back (and proof that it needs no unpickling)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _numerics_worker(rank: int, init_file: str, optimizer_name: str, stage: int, out: str) -> None:
    import torch.distributed as dist

    from pipeline.distributed import full_model_state, full_optimizer_state, shard_model, shard_optimizer_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        def images(r: int) -> bool:  # stage 2: rank 0's first micro-batch is text only
            return not (stage == 2 and r == 0)

        def build():
            m = _model()
            if stage == 2:
                m.freeze_stage2()
            return m

        def optim(m):
            # fused AdamW: what a skipped step (TrainConfig.skip_spikes) needs
            return build_optimizer(m, optimizer_name, lr=1e-3, weight_decay=0.1, muon_lr=0.02, fused=True)

        plain = build()
        plain_opt = optim(plain)
        sharded = shard_model(build(), torch.device("cpu"))
        sharded_opt = optim(sharded)
        report: dict = {}
        # step 1
        parts_plain, parts_sharded = {}, {}
        norm_plain = _plain_step(plain, plain_opt, [_batch(r, 0, images(r)) for r in range(WORLD)], parts_plain)
        norm_sharded = _sharded_step(sharded, sharded_opt, _batch(rank, 0, images(rank)), parts_sharded)
        state = full_model_state(sharded)
        full_optim = [full_optimizer_state(o.state_dict(), keep=rank == 0) for o in sharded_opt.optimizers]
        if rank == 0:
            report["step1"] = {"norm": [norm_plain, norm_sharded], "parts": [parts_plain, parts_sharded],
                               "weights": _max_diff(state, plain.state_dict()),
                               "optimizer": _optim_diff({"optimizers": full_optim}, plain_opt.state_dict())}
            report["sharded_params"] = sum(isinstance(p, torch.distributed.tensor.DTensor)
                                           for p in sharded.parameters())
            report["params"] = sum(1 for _ in plain.parameters())
        # a fresh sharded model from the plain model's full state, as a resumed FSDP run starts
        resumed = build()
        resumed.load_state_dict(plain.state_dict())
        resumed = shard_model(resumed, torch.device("cpu"))
        resumed_opt = optim(resumed)
        saved = _disk_round_trip(plain_opt.state_dict())["optimizers"]
        resumed_opt.load_state_dict({"optimizers": [shard_optimizer_state(o, s)
                                                    for o, s in zip(resumed_opt.optimizers, saved)]})
        # step 2
        _plain_step(plain, plain_opt, [_batch(r, 1, True) for r in range(WORLD)])
        _sharded_step(resumed, resumed_opt, _batch(rank, 1, True))
        state = full_model_state(resumed)
        optim_before = [full_optimizer_state(o.state_dict(), keep=rank == 0) for o in resumed_opt.optimizers]
        # step 3, skipped on the device (a spike): sharded weights and states stay as they were
        _sharded_step(resumed, resumed_opt, _batch(rank, 2, True), skip=torch.tensor(1.0))
        state_after = full_model_state(resumed)
        optim_after = [full_optimizer_state(o.state_dict(), keep=rank == 0) for o in resumed_opt.optimizers]
        if rank == 0:
            report["step2_weights"] = _max_diff(state, plain.state_dict())
            report["skipped_weights"] = _max_diff(state_after, state)
            report["skipped_optimizer"] = _optim_diff({"optimizers": optim_after}, {"optimizers": optim_before})
            Path(out).write_text(json.dumps(report))
        dist.barrier()  # leave together: a rank that tears gloo down while the other still writes can abort
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("optimizer_name,stage", [("adamw", 2), ("muon", 1)])
def test_fsdp_step_matches_a_plain_step(tmp_path, optimizer_name, stage):
    out = tmp_path / "report.json"
    mp.spawn(_numerics_worker, args=(str(tmp_path / "pg"), optimizer_name, stage, str(out)), nprocs=WORLD)
    report = json.loads(out.read_text())
    assert report["sharded_params"] == report["params"]  # every parameter is a DTensor under FSDP2
    step1 = report["step1"]
    assert math.isclose(*step1["norm"], rel_tol=1e-4), step1
    assert step1["norm"][0] > 0.5, "the test should exercise clipping"
    plain_parts, sharded_parts = step1["parts"]  # the pre-clip norm of each part, gathered over the shards
    assert plain_parts.keys() == sharded_parts.keys() and {"grad_norm_gpt", "weight_norm_gpt"} <= set(plain_parts)
    assert all(math.isclose(plain_parts[k], sharded_parts[k], rel_tol=1e-4) for k in plain_parts), step1
    grads = [v for k, v in sharded_parts.items() if k.startswith("grad_norm_")]
    assert math.isclose(math.hypot(*grads), step1["norm"][1], rel_tol=1e-4), step1
    # a first Adam step is lr * g / (|g| + eps): entries with |g| near eps amplify rounding, so
    # allow 2% of lr (1e-3); a wrong shard, scale or missing gradient shows up as ~lr
    assert step1["weights"] < 2e-5, report
    assert step1["optimizer"] < 1e-5, report
    assert report["step2_weights"] < 2e-5, report
    assert report["skipped_weights"] == 0 and report["skipped_optimizer"] == 0, report


def _run(ws, run_name: str, workers: int, strategy: str, steps: int, **kw):
    return run_stage(_cfg(ws, stage=1, run_name=run_name, num_workers=workers, strategy=strategy, optimizer="muon",
                          steps=steps, batch_size=1, warmup_steps=1, log_every=1, **kw))


@pytest.fixture(scope="module")
def fsdp_run(workspace):  # noqa: F811  (the fixture above)
    """3 Muon steps on 2 FSDP workers, with the sample prediction (rank 0 on a gathered copy)."""
    return _run(workspace, "fsdp", 2, "fsdp", 3)


@pytest.mark.slow
def test_fsdp_workers_log_and_write_a_one_gpu_checkpoint(workspace, fsdp_run):
    assert fsdp_run.metrics["step"] == 3
    client = MlflowClient(workspace["uri"])
    losses = client.get_metric_history(fsdp_run.run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3]
    assert all(math.isfinite(m.value) and m.value > 0 for m in losses), losses
    norms = {m.step: m.value for m in client.get_metric_history(fsdp_run.run_id, "grad_norm")}
    assert sorted(norms) == [1, 2, 3] and all(math.isfinite(v) for v in norms.values()), norms
    metrics = client.get_run(fsdp_run.run_id).data.metrics
    parts = sorted(k for k in metrics if k.startswith("grad_norm_") and k != "grad_norm_max")  # by part, pre-clip
    assert parts == [f"grad_norm_{p}" for p in ("clip", "compressor", "gpt", "projector", "sam")], parts
    by_step = [{m.step: m.value for m in client.get_metric_history(fsdp_run.run_id, k)} for k in parts]
    for step, total in norms.items():
        assert math.isclose(math.hypot(*(p[step] for p in by_step)), total, rel_tol=1e-3), (step, total, by_step)
    # one step per report (log_every 1): the window's largest norm is that step's
    assert {m.step: m.value for m in client.get_metric_history(fsdp_run.run_id, "grad_norm_max")} == norms
    assert "samples/sample_prediction.png" in {a.path for a in client.list_artifacts(fsdp_run.run_id, "samples")}

    # the one-GPU layout: full weights that load strictly, full-shaped plain optimizer tensors
    model, _, meta = load_checkpoint(fsdp_run.checkpoint_dir)
    assert meta["step"] == 3 and meta["train"]["strategy"] == "fsdp" and meta["train"]["num_workers"] == 2
    weights = load_file(str(Path(fsdp_run.checkpoint_dir) / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape)
                                                               for k, v in model.state_dict().items()}
    state = load_optimizer_state(fsdp_run.checkpoint_dir)
    assert state["step"] == 3
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # as the train loop does
    fresh = build_optimizer(model, "muon", 1e-3)
    for part, saved in zip(fresh.optimizers, state["optimizer"]["optimizers"], strict=True):
        params = [p for g in part.param_groups for p in g["params"]]
        assert len(saved["state"]) == len(params)
        for index, entry in saved["state"].items():
            for key, value in entry.items():
                if key != "step":
                    assert type(value) is torch.Tensor and value.shape == params[index].shape, (index, key)


@pytest.mark.slow
def test_checkpoints_move_between_fsdp_and_ddp(workspace, fsdp_run):
    """FSDP at 2 workers -> DDP at 1 worker -> FSDP at 2 workers, each resuming the last."""
    client = MlflowClient(workspace["uri"])
    ddp = _run(workspace, "fsdp-to-ddp", 1, "ddp", 5, sample_prediction=False, resume_from=fsdp_run.checkpoint_dir)
    assert ddp.metrics["step"] == 5
    assert sorted(m.step for m in client.get_metric_history(ddp.run_id, "loss")) == [4, 5]
    back = _run(workspace, "ddp-to-fsdp", 2, "fsdp", 7, sample_prediction=False, resume_from=ddp.checkpoint_dir)
    assert back.metrics["step"] == 7
    losses = client.get_metric_history(back.run_id, "loss")
    assert sorted(m.step for m in losses) == [6, 7]
    assert all(math.isfinite(m.value) for m in losses), losses
