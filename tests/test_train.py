"""Two-stage training on real Ray Train + MLflow (SQLite), tiny preset on CPU.

Tier 1: stage 1 overfits 10 synthetic pages and greedy decoding reads each one back exactly.
Also: stage 2 freezing, crash-and-resume through FailureConfig, and the MLflow record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from model.engine import Engine, GenerationRequest, SamplingParams
from model.processor import ImageProcessor
from model.config import processor_config
from model.vlm import ImageViews
from model.weights import load_checkpoint
from pipeline.synth import SynthConfig, generate, read_manifest, text_records
from pipeline.train import TrainConfig, load_train_config, run_stage

pytestmark = pytest.mark.slow

# Muon on the GPT's matrices, one packed row (~9 pages) a step, lr x0.1 for the last quarter: the
# pages separate around steps 200-225 and all 10 read back at 300 (final loss ~0.002 with seeds 0 and
# 1 here; seeds 0-2 of init and data order in a sweep, which also passed 5/5 seeds at 250 steps or at
# muon_lr 0.02). stage1_tiny.yaml's AdamW recipe needed 600 steps of two rows here (4x the work);
# AdamW with two rows for 300 steps, or one row for 400 (1 seed of 3), missed pages. The demo keeps
# AdamW: on its 8 markdown pages this recipe read 1/8 back after 450 steps, AdamW 8/8 by step 300.
# Without preserve_order the data order varied between runs of one seed on a 4-CPU Ray (final loss
# 0.0114 once, 0.0010 twice) and the test missed one page in two runs of session 15; with it, three
# runs ended at the same loss to the last digit.
OVERFIT_STEPS = 300


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, ray_local, new_mlflow_store):
    """10 easy synthetic pages (free OCR) + text records, preprocessed into shards."""
    from pipeline.preprocess import PreprocessConfig, run_preprocess

    root = tmp_path_factory.mktemp("train")
    manifest = generate(root / "pages", 10, SynthConfig.easy(tasks=("free",)), seed=0)
    text_manifest = root / "text.jsonl"
    text_manifest.write_text("".join(json.dumps(r) + "\n" for r in text_records(8, seed=0)))
    result = run_preprocess(PreprocessConfig(manifests=[str(manifest), str(text_manifest)], out=str(root / "shards"),
                                             mode="tiny", preset="tiny", vocab_size=1024, max_seq_len=1024,
                                             rows_per_file=8))
    assert result.rows_failed == 0
    return {"root": root, "manifest": manifest, "shards": str(root / "shards"),
            "uri": new_mlflow_store(root), "runs": str(root / "runs")}


def _cfg(ws, **kw):
    base = dict(preset="tiny", data=[ws["shards"]], out=ws["runs"], tracking_uri=ws["uri"], seq_len=1024,
                batch_size=2, lr=3e-3, encoder_lr_scale=0.1, schedule="step", step_milestones=[0.75], step_gamma=0.1,
                warmup_steps=20, log_every=10, preserve_order=True,  # one seed, one run (Ray has 4 CPUs here)
                experiment="test-train")
    base.update(kw)
    return load_train_config(None, **base)


@pytest.fixture(scope="module")
def stage1(workspace):
    cfg = _cfg(workspace, stage=1, run_name="s1", steps=OVERFIT_STEPS, checkpoint_every=150, batch_size=1,
               optimizer="muon", muon_lr=0.05)
    return cfg, run_stage(cfg)


def test_stage1_overfits_and_reads_every_page_back(workspace, stage1):
    _, result = stage1
    assert result.metrics["loss"] < 0.05, result.metrics
    model, tokenizer, meta = load_checkpoint(result.checkpoint_dir)
    assert meta["processor"]["mode"] == "tiny" and meta["step"] == OVERFIT_STEPS
    processor = ImageProcessor(processor_config("tiny"))
    records = [r for r in read_manifest(workspace["manifest"]) if r["task"] == "free"]
    assert len(records) == 10
    requests = [GenerationRequest(r["prompt"], [ImageViews.from_processed(processor.process(r["image"]))],
                                  params=SamplingParams(max_new_tokens=300)) for r in records]
    outputs = Engine(model, tokenizer).generate(requests)
    wrong = [(r["id"], o.text) for r, o in zip(records, outputs) if o.text != r["response"]]
    assert not wrong, f"{len(wrong)} pages not reproduced: {wrong[:2]}"


def test_mlflow_records_params_metrics_and_artifacts(workspace, stage1):
    _, result = stage1
    client = MlflowClient(workspace["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.preset"] == "tiny" and params["train.stage"] == "1"
    assert params["model.gpt.n_layer"] == "2" and "git_commit" in params and "data.rows_out" in params
    losses = client.get_metric_history(result.run_id, "loss")
    assert len(losses) >= OVERFIT_STEPS // 10 and losses[-1].value < losses[0].value
    for key in ("lr", "grad_norm", "tokens_per_s", "samples_per_s"):
        assert client.get_metric_history(result.run_id, key)
    norms = {m.step: m.value for m in client.get_metric_history(result.run_id, "grad_norm")}
    for part in ("sam", "compressor", "clip", "projector", "gpt"):  # each reported step, by part too
        assert sorted(m.step for m in client.get_metric_history(result.run_id, f"grad_norm_{part}")) == sorted(norms)
        weights = client.get_metric_history(result.run_id, f"weight_norm_{part}")
        assert sorted(m.step for m in weights) == sorted(norms) and all(m.value > 0 for m in weights)
    window_max = {m.step: m.value for m in client.get_metric_history(result.run_id, "grad_norm_max")}
    assert window_max.keys() == norms.keys() and all(window_max[s] >= norms[s] for s in norms)
    assert any(window_max[s] > norms[s] for s in norms)  # a window of 10 steps: its largest is rarely the last
    per_step = [m.value / t.value for m, t in zip(client.get_metric_history(result.run_id, "samples_per_s"),
                                                 client.get_metric_history(result.run_id, "tokens_per_s"))]
    assert all(0 < v < 1 for v in per_step)  # a sample is more than one token of a packed row
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert "samples/sample_prediction.png" in artifacts
    assert {a.path for a in client.list_artifacts(result.run_id, "checkpoint")} == {"checkpoint/config.json"}


def test_stage_datasets_split_vision_and_text_rows(workspace):
    """Stage 1 reads the 10 page rows alone; stage 2 mixes the 8 text rows in at its text_ratio."""
    from pipeline.mixture import mixture_counts
    from pipeline.train import _datasets

    s1 = _datasets(_cfg(workspace, stage=1, shuffle=False))
    assert s1.count() == 10 and all(r["n_image_tokens"] > 0 for r in s1.take_all())
    s2 = _datasets(_cfg(workspace, stage=2, init_from="unused", text_ratio=0.3, shuffle=False)).take_all()
    n_vision, n_text = mixture_counts(10, 8, 0.3)
    assert sum(r["n_image_tokens"] > 0 for r in s2) == n_vision and sum(not r["n_image_tokens"] for r in s2) == n_text


@pytest.fixture(scope="module")
def stage2(workspace, stage1):
    """Stage 2 from the overfit checkpoint, under a pipeline run. Rank 0 dies once at step 3 (the
    last checkpoint is at 2) and the run resumes; steps 5-6 run under the profiler. Balanced
    packing (two 512 px pages per row at most) and the prefetch thread are on the same path."""
    _, s1 = stage1
    parent = MlflowClient(workspace["uri"]).create_run(
        MlflowClient(workspace["uri"]).get_run(s1.run_id).info.experiment_id, run_name="pipeline").info.run_id
    cfg = _cfg(workspace, stage=2, run_name="s2", steps=8, lr=1e-3, init_from=s1.checkpoint_dir, text_ratio=0.3,
               parent_run_id=parent, warmup_steps=0, schedule="step", log_every=1, checkpoint_every=2,
               max_failures=1, inject_failure_at_step=3, max_row_megapixels=0.53, pack_lookahead=4,
               prefetch_batches=2, profile_at=5, profile_steps=2)
    return parent, run_stage(cfg)


def test_stage2_freezes_sam_and_compressor_only(workspace, stage1, stage2):
    _, s1 = stage1
    parent, s2 = stage2
    before = load_file(str(Path(s1.checkpoint_dir) / "model.safetensors"))
    after = load_file(str(Path(s2.checkpoint_dir) / "model.safetensors"))
    sam = [k for k in before if k.startswith("sam_model.")]
    assert sam and all(torch.equal(before[k], after[k]) for k in sam)
    trainable = [k for k in before if not k.startswith("sam_model.") and "patch_embedding" not in k]
    changed = [k for k in trainable if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.8 * len(trainable), f"only {len(changed)}/{len(trainable)} tensors changed"
    client = MlflowClient(workspace["uri"])
    run = client.get_run(s2.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert s2.model_version is not None
    version = client.get_model_version("nano-deepseek-ocr", s2.model_version)
    assert version.run_id == s2.run_id


def test_profiled_steps_leave_a_trace_and_a_report_in_mlflow(workspace, stage2, tmp_path):
    _, s2 = stage2
    client = MlflowClient(workspace["uri"])
    assert {a.path for a in client.list_artifacts(s2.run_id, "profile")} == {"profile/report.txt",
                                                                             "profile/trace.json.gz"}
    report = Path(client.download_artifacts(s2.run_id, "profile/report.txt", str(tmp_path))).read_text()
    assert report.startswith("steps 5..6:"), report
    for phase in ("data", "forward", "backward", "optimizer"):
        assert f"{phase} " in report.splitlines()[1], report
    [wall] = client.get_metric_history(s2.run_id, "profile_step_ms")
    [forward] = client.get_metric_history(s2.run_id, "profile_forward_ms")
    assert wall.step == 7 and 0 < forward.value < wall.value


def test_worker_crash_resumes_from_last_checkpoint(workspace, stage2):
    _, result = stage2
    marker = Path(workspace["runs"]) / "s2" / "fault_injected"
    assert marker.is_file(), "the fault was never injected"
    assert result.metrics["step"] == 8
    _, _, meta = load_checkpoint(result.checkpoint_dir, with_tokenizer=False)
    assert meta["step"] == 8 and meta["stage"] == 2
    client = MlflowClient(workspace["uri"])
    steps = [m.step for m in client.get_metric_history(result.run_id, "loss")]
    # died after 3 steps with the last checkpoint at 2: step 3 ran twice, then on to 8
    assert steps.count(3) == 2 and steps.count(2) == 1 and max(steps) == 8, steps
    waits = client.get_metric_history(result.run_id, "data_wait_s")
    assert len(waits) == len(steps) and all(m.value >= 0 for m in waits)


def test_a_stage_past_its_wall_clock_deadline_checkpoints_and_resumes(workspace):
    """stop_at_unix_s (a lent machine's call limit): the stage stops at the first step that ends past
    it, however long the steps before the loop took, with a checkpoint that the next call resumes."""
    first = run_stage(_cfg(workspace, stage=1, run_name="deadline", steps=3, stop_at_unix_s=time.time()))
    assert not first.complete and first.metrics["step"] == 1 and first.metrics["stopped_at_time_limit"] == 1.0
    _, _, meta = load_checkpoint(first.checkpoint_dir, with_tokenizer=False)
    assert meta["step"] == 1
    second = run_stage(_cfg(workspace, stage=1, run_name="deadline", steps=3,
                            stop_at_unix_s=time.time() + 3600))  # far off: no effect
    assert second.complete and second.run_id == first.run_id and second.metrics["step"] == 3
    # each call logged where its time went before its first step (pipeline/startup.py), at that step
    client = MlflowClient(workspace["uri"])
    phases = {key: client.get_metric_history(first.run_id, f"startup_{key}_s")
              for key in ("workers", "model", "first_batch", "first_step", "total")}
    for key, history in phases.items():
        assert sorted(m.step for m in history) == [1, 2] and all(m.value >= 0 for m in history), key
    for call in (1, 2):
        parts = sum(m.value for key, history in phases.items() if key != "total" for m in history if m.step == call)
        [total] = [m.value for m in phases["total"] if m.step == call]
        assert parts == pytest.approx(total), call  # the phases add up to the whole wait


def test_a_stage_past_its_end_time_ends_as_finished_at_the_step_it_reached(workspace):
    """end_at_unix_s (a lease that must end with a measured model): the first step that ends past it
    is the last; it exports the final checkpoint and the stage is complete, marked as ended early."""
    result = run_stage(_cfg(workspace, stage=1, run_name="ends", steps=3, end_at_unix_s=time.time(),
                            stop_at_unix_s=time.time()))  # both passed: the end wins
    assert result.complete and result.metrics["step"] == 1 and result.metrics["ended_early_at_step"] == 1.0
    assert "stopped_at_time_limit" not in result.metrics
    _, _, meta = load_checkpoint(result.checkpoint_dir, with_tokenizer=False)
    assert meta["step"] == 1
    run = MlflowClient(workspace["uri"]).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["ended_early_at_step"] == 1.0
    assert run.data.metrics["flops_per_s"] > 0  # the step's views and tokens counted (model.flops): the MFU's base


def test_compile_and_compile_gpt_together_are_refused():
    with pytest.raises(ValueError, match="compile already compiles the whole model"):
        TrainConfig(data="x", compile=True, compile_gpt=True)
    assert TrainConfig(data="x", compile_gpt=True, compile_vision=True).compile_gpt
    with pytest.raises(ValueError, match="compile_vision_unit must be one of tower, block"):
        TrainConfig(data="x", compile_vision=True, compile_vision_unit="layer")
