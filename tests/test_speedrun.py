"""The main job end to end on a minimal budget: every artifact exists, a re-run skips the steps."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from free_ports import free_ports

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "jobs"))  # after the repo root: jobs/serve.py must not shadow serve/
pytestmark = pytest.mark.slow


def test_speedrun_minimal_budget_writes_every_artifact(tmp_path, monkeypatch, ray_local, capsys, mlflow_uri):
    import speedrun
    from mlflow import MlflowClient
    from ray import serve

    uri = mlflow_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "artifacts"
    args = ["--out", str(out), "--stage1-steps", "3", "--stage2-steps", "2", "--train-pages", "2",
            "--serve-port", str(free_ports()[0])]
    client = MlflowClient(uri)

    # a first call whose deadline has passed: stage 1 checkpoints at step 1 and the speedrun stops there,
    # its MLflow run KILLED (like the stage's) until a later call resumes it
    assert speedrun.main(args + ["--no-serve", "--stage1-stop-within", "0"]) == 0
    assert "==> stage 1 stopped at its time limit at step 1" in capsys.readouterr().out
    state = json.loads((out / "speedrun_state.json").read_text())
    assert client.get_run(state["pipeline_run_id"]).info.status == "KILLED"
    assert client.get_run(state["stage1_run_id"]).info.status == "KILLED"
    assert not (out / "runs/stage1-tiny/final/model.safetensors").exists()

    try:
        assert speedrun.main(args) == 0
    finally:
        serve.shutdown()
    printed = capsys.readouterr().out
    for path in ["data/train/manifest.jsonl", "data/heldout/manifest.jsonl", "data/text.jsonl",
                 "tokenizer/tokenizer.json", "shards/stats.json", "shards/tokenizer.json",
                 "runs/stage1-tiny/final/model.safetensors", "runs/stage2-tiny/final/model.safetensors",
                 "eval/summary.json", "compare/stages.md", "compare/stages.png",
                 "demo/train.mmd", "demo/train_boxes.png", "demo/heldout.mmd", "demo/heldout_boxes.png",
                 "speedrun_state.json"]:
        assert (out / path).is_file(), path
    assert "CER" in printed and "mlflow ui --backend-store-uri" in printed
    stopped = state
    state = json.loads((out / "speedrun_state.json").read_text())
    for key in ("pipeline_run_id", "stage1_run_id"):  # resumed, not started again
        assert state[key] == stopped[key], key
    for key in ("stage1_run_id", "stage2_run_id"):
        run = client.get_run(state[key])
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == state["pipeline_run_id"]
    parent = client.get_run(state["pipeline_run_id"])
    assert parent.info.status == "FINISHED"
    assert "demo_train_cer" in parent.data.metrics and "demo_heldout_cer" in parent.data.metrics

    # a second run finds every output and skips straight to the summary
    assert speedrun.main(args + ["--no-serve"]) == 0
    again = capsys.readouterr().out
    for step in ("synthetic data", "tokenizer", "preprocess", "stage 1", "stage 2", "evaluation"):
        assert f"==> {step}" in again and "skipped" in again.split(f"==> {step}")[1].splitlines()[0], step

    # an evaluation stopped before its summary goes on from the splits it finished (here: all of them)
    summary = json.loads((out / "eval/summary.json").read_text())
    (out / "eval/summary.json").unlink()
    assert speedrun.main(args + ["--no-serve"]) == 0
    resumed = capsys.readouterr().out
    assert "==> evaluation (Ray Data actors)\n" in resumed
    for split in ("train", "heldout"):
        assert f"{split}: evaluated earlier on this checkpoint" in resumed, split
    assert json.loads((out / "eval/summary.json").read_text()) == summary
    assert client.get_run(state["pipeline_run_id"]).info.status == "FINISHED"


def test_a_split_is_evaluated_again_when_the_checkpoint_changes(tmp_path):
    import os

    import speedrun

    cfg = speedrun.load_config(None, out=str(tmp_path))
    weights = speedrun.stage_dir(cfg, cfg.final_stage) / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    key = speedrun.split_key(cfg, "heldout", 10)
    assert speedrun.split_key(cfg, "heldout", 10) == key
    assert speedrun.split_key(cfg, "heldout", 20) != key  # another number of records
    os.utime(weights, ns=(1, 1))  # a retrained stage writes the weights again
    assert speedrun.split_key(cfg, "heldout", 10) != key


@pytest.mark.parametrize("name", ["speedrun_tier2_glyphs", "speedrun_tier2_glyphs_base", "speedrun_tier2_glyphs_grid",
                                  "speedrun_tier2_glyphs_norm", "speedrun_tier2_pseudo", "speedrun_tier2_fonts",
                                  "speedrun_tier2_zoom", "speedrun_tier2_zoom_pages",
                                  "speedrun_tier2_zoom_pages_c2"])
def test_glyph_recipe_configs_load(name):
    import speedrun

    stage1 = speedrun.stage_config(speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml")), 1)
    crops = 2 if name.endswith("_c2") else 8  # zoom_pages with more of the step's compute on whole pages
    name = name.removesuffix("_c2")
    pages = name.endswith("_pages")  # the zoom recipe with more of the stream on whole pages
    assert stage1.synth.tasks == ({"line": 0.3, "free": 0.35, "markdown": 0.35} if pages
                                  else {"line": 0.5, "free": 0.25, "markdown": 0.25})
    name = name.removesuffix("_pages")
    assert stage1.glyph_loss > 0 and stage1.slot_centering
    assert stage1.synth.crops_per_page == crops
    normed = name.endswith(("_norm", "_pseudo", "_fonts", "_zoom"))
    assert stage1.glyph_cell == ("grid" if normed or name.endswith("_grid") else "bag")
    assert stage1.projector_input_norm == normed == (stage1.skip_spikes == 100)
    page = stage1.synth.synth_config()
    assert page.pseudo_word_prob == (0.3 if name.endswith(("_pseudo", "_fonts", "_zoom")) else 0.0)
    fonts = name.endswith(("_fonts", "_zoom"))  # all salad, Computer Modern too
    zoom = name.endswith("_zoom")  # line crops at sizes between the page's and their own; both read
    measured_steps = {"glyphs": 2200, "glyphs_base": 2150, "fonts": 2000}  # the others: 3000 (RESULTS.md)
    assert stage1.steps == measured_steps.get(name.removeprefix("speedrun_tier2_"), 3000)
    assert page.word_salad_prob == (1.0 if fonts else 0.9)
    assert page.train_fonts == (("sans", "serif", "mono", "cm_roman", "cm_sans", "cm_typewriter") if fonts
                                else ("sans", "serif", "mono"))
    assert stage1.synth.crop_scale == ("zoom" if zoom else "crop")
    assert list(speedrun.line_crop_splits(speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml")))) == (
        [speedrun.HELDOUT_LINES, speedrun.HELDOUT_LINES_ON_PAGE] if fonts else [speedrun.HELDOUT_LINES])
    on_page = speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml"), stream_crop_scale="page")
    assert speedrun.stage_config(on_page, 1).synth.crop_scale == "page"
    assert stage1.stop_at_unix_s is None
    deadline = speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml"), stage1_stop_at_unix_s=1.8e9)
    assert speedrun.stage_config(deadline, 1).stop_at_unix_s == 1.8e9  # --stage1-stop-within, from the start
    assert stage1.end_at_unix_s is None
    ending = speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml"), stage1_end_at_unix_s=1.8e9)
    assert speedrun.stage_config(ending, 1).end_at_unix_s == 1.8e9  # --stage1-end-within


def test_blocks_recipe_is_zoom_pages_c2_with_half_its_line_pages_on_blocks():
    import speedrun

    def stage1(name: str):
        return speedrun.stage_config(speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml")), 1)

    blocks, c2 = stage1("speedrun_tier2_zoom_blocks"), stage1("speedrun_tier2_zoom_pages_c2")
    assert blocks.synth.tasks == {"line": 0.15, "block": 0.15, "free": 0.35, "markdown": 0.35}
    assert dataclasses.replace(blocks.synth, tasks=c2.synth.tasks) == c2.synth
    assert dataclasses.replace(blocks, synth=c2.synth, data=c2.data, tokenizer=c2.tokenizer, out=c2.out,
                               export_dir=c2.export_dir) == c2  # the rest of the recipe is the same


def test_spaced_recipe_is_zoom_pages_c2_with_wider_line_spacing_on_training_pages():
    import speedrun

    spaced, c2 = (speedrun.load_config(str(REPO / f"jobs/configs/{name}.yaml"))
                  for name in ("speedrun_tier2_spaced", "speedrun_tier2_zoom_pages_c2"))
    assert spaced.synth_config().train_line_spacing_range == (1.1, 2.4)
    assert spaced.synth_config().line_spacing_range == c2.synth_config().line_spacing_range  # held-out pages
    overrides = {k: v for k, v in spaced.synth_overrides.items() if k != "train_line_spacing_range"}
    assert dataclasses.replace(spaced, synth_overrides=overrides, out=c2.out) == c2


def test_stream_render_tasks_reach_stage_one():
    import speedrun

    path = str(REPO / "jobs/configs/speedrun_tier2_zoom_pages_c2.yaml")
    assert speedrun.stage_config(speedrun.load_config(path), 1).synth.render_tasks is None
    assert speedrun.stage_config(speedrun.load_config(path, stream_render_tasks=12), 1).synth.render_tasks == 12


def test_synth_overrides_reach_the_pages_on_disk_and_the_stream(tmp_path):
    import speedrun

    from pipeline.synth import load_corpus, read_manifest

    cfg = speedrun.load_config(str(REPO / "jobs/configs/speedrun_tier2_pseudo.yaml"), out=str(tmp_path),
                               train_pages=1, heldout_pages=1, eval_line_crops=0)
    assert speedrun.stage_config(cfg, 1).synth.synth_config().pseudo_word_prob == 0.3
    assert cfg.synth_config().pseudo_word_prob == 0.3 and cfg.synth_config(noise=0.0).noise == 0.0
    known = set(load_corpus("train").words)

    def new_words(overrides: dict, out: Path) -> set[str]:
        cfg.synth_overrides, cfg.out = overrides, str(out)
        speedrun.make_data(cfg)
        records = read_manifest(out / "data" / "train" / "manifest.jsonl")
        text = " ".join(r["response"] for r in records if r["task"] == "free")
        return {w.lower() for w in re.findall(r"[A-Za-z]{4,}", text)} - known

    plain, pseudo = new_words({}, tmp_path / "plain"), new_words({"pseudo_word_prob": 1.0}, tmp_path / "pseudo")
    assert len(pseudo) > len(plain) + 5, (plain, pseudo)  # the train pages on disk carry pseudo-words
    with pytest.raises(ValueError, match="unknown synth_overrides fields: \\['pseudo_words'\\]"):
        speedrun.load_config(None, synth_overrides={"pseudo_words": 0.3})
    with pytest.raises(ValueError, match="synth_overrides may not set \\['tasks'\\]"):  # the speedrun's `tasks:`
        speedrun.make_data(speedrun.load_config(None, out=str(tmp_path / "x"), synth_overrides={"tasks": ["free"]}))


def test_line_crops_of_the_heldout_pages_are_evaluated_when_asked(tmp_path):
    import speedrun

    from pipeline.synth import read_manifest

    cfg = speedrun.load_config(str(REPO / "jobs/configs/speedrun_tiny.yaml"), out=str(tmp_path), train_pages=1,
                               heldout_pages=2)
    assert list(speedrun.eval_splits(cfg)) == ["train", "heldout"]
    cfg.eval_line_crops = 3
    assert speedrun.eval_splits(cfg) == {"train": None, "heldout": None, speedrun.HELDOUT_LINES: 3}
    speedrun.make_data(cfg)
    pages = {r["id"].rsplit("-", 1)[0] for r in read_manifest(tmp_path / "data" / "heldout" / "manifest.jsonl")}
    lines = list(read_manifest(tmp_path / "data" / speedrun.HELDOUT_LINES / "manifest.jsonl"))
    assert lines and {r["task"] for r in lines} == {"line"}
    assert {r["id"].rsplit("-", 1)[0] for r in lines} == pages  # the held-out pages, cut into their lines
    assert not (tmp_path / "data" / speedrun.HELDOUT_LINES_ON_PAGE).exists()

    cfg.eval_lines_on_page = True  # asked for: the same crops at the page's text size too
    assert list(speedrun.eval_splits(cfg))[-1] == speedrun.HELDOUT_LINES_ON_PAGE
    cfg.eval_lines_on_page = False
    cfg.stream_crop_scale = "page"  # trained on crops at page scale: read so too, and alone as before
    assert speedrun.eval_splits(cfg) == {"train": None, "heldout": None, speedrun.HELDOUT_LINES: 3,
                                         speedrun.HELDOUT_LINES_ON_PAGE: 3}
    cfg.stream_crop_scale = "zoom"  # sizes between the two: both ends are read
    assert list(speedrun.eval_splits(cfg))[2:] == [speedrun.HELDOUT_LINES, speedrun.HELDOUT_LINES_ON_PAGE]
    speedrun.make_data(cfg)
    on_page = list(read_manifest(tmp_path / "data" / speedrun.HELDOUT_LINES_ON_PAGE / "manifest.jsonl"))
    assert [(r["id"], r["response"]) for r in on_page] == [(r["id"], r["response"]) for r in lines]
    page_size = Image.open(tmp_path / "data" / "heldout" / "images" / f"{on_page[0]['page']}.png").size
    assert Image.open(on_page[0]["image"]).size == page_size
    assert Image.open(lines[0]["image"]).size != page_size
