"""Evaluation: benchmark loaders, scoring, Ray Data inference end to end into MLflow, the
Tesseract baseline, and the fixed test images read by jobs/vision_sample.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.grounding import parse_grounding
from model.tasks import prompt_for
from pipeline import benchmarks as B
from pipeline import evaluate as E

REPO = Path(__file__).resolve().parents[1]
TEST_IMAGES = REPO / "data" / "test_images"



@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory) -> Path:
    """Two easy held-out pages, each as a markdown and a free-OCR record (4 records)."""
    from pipeline.synth import SynthConfig, generate

    cfg = SynthConfig.easy(noise=0.0, tasks=("markdown", "free"))
    return generate(tmp_path_factory.mktemp("evalset"), 2, cfg, seed=11, split="heldout")


# --------------------------------------------------------------------------------- loaders


def test_fox_loader(tmp_path):
    data = [
        {"image": "en_1.png", "conversations": [
            {"from": "human", "value": "<image>\nPlease give the OCR result of this page:"},
            {"from": "gpt", "value": "Hello world.\nSecond line."}]},
        {"image": "en_2.png", "conversations": [
            {"from": "human", "value": "<image>\nOCR this page:"}, {"from": "gpt", "value": "Page two."}]},
    ]
    path = tmp_path / "en_page_ocr.json"
    path.write_text(json.dumps(data))
    images = tmp_path / "en_pdf_png"
    records = B.load_fox(path, images)
    assert [r["response"] for r in records] == ["Hello world.\nSecond line.", "Page two."]
    assert records[0]["image"] == str((images / "en_1.png").resolve())
    assert records[0]["prompt"] == prompt_for("free") and records[0]["task"] == "free"
    assert records[0]["source_prompt"].startswith("<image>\nPlease give")
    assert records[0]["boxes"] == []
    assert B.detect_format(path) == "fox"
    assert len(B.load_eval_records(path, images, limit=1)) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "x.png", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(B.BenchmarkFormatError, match="no 'gpt' turn"):
        B.load_fox(bad)


def _poly(x1, y1, x2, y2):
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def test_omnidocbench_loader(tmp_path):
    page = {
        "layout_dets": [
            {"category_type": "text_block", "poly": _poly(100, 600, 900, 800), "ignore": False, "order": 2,
             "anno_id": 1, "text": "Second paragraph."},
            {"category_type": "title", "poly": _poly(100, 200, 500, 400), "ignore": False, "order": 1,
             "anno_id": 2, "text": "A Title"},
            {"category_type": "header", "poly": _poly(0, 0, 1000, 50), "ignore": False, "order": 0,
             "anno_id": 3, "text": "Running head"},
            {"category_type": "table", "poly": _poly(100, 900, 900, 1200), "ignore": False, "order": 3,
             "anno_id": 4, "html": "<table><tr><td>1</td></tr></table>", "latex": "\\begin{tabular}"},
            {"category_type": "text_block", "poly": _poly(100, 1300, 900, 1400), "ignore": True, "order": 4,
             "anno_id": 5, "text": "ignored"},
            {"category_type": "figure", "poly": _poly(100, 1500, 900, 1900), "ignore": False, "order": 5,
             "anno_id": 6},
            {"category_type": "equation_isolated", "poly": _poly(100, 1950, 900, 2000), "ignore": False,
             "order": 6, "anno_id": 7, "latex": "$$x^2$$"},
        ],
        "page_info": {"page_no": 0, "height": 2000, "width": 1000, "image_path": "docs/page_a.jpg",
                      "page_attribute": {"language": "en"}},
        "extra": {"relation": []},
    }
    path = tmp_path / "OmniDocBench.json"
    path.write_text(json.dumps([page]))
    assert B.detect_format(path) == "omnidocbench"
    md, free = B.load_omnidocbench(path, tasks=("markdown", "free"))
    assert md["image"] == str((tmp_path / "images" / "page_a.jpg").resolve())
    assert [b["label"] for b in md["boxes"]] == ["title", "text", "table", "image", "equation"]
    assert md["boxes"][0]["box"] == [100, 100, 500, 200]  # poly bounds scaled to 0..999
    assert md["boxes"][-1]["box"] == [100, 974, 899, 999]
    assert [b.label for b in parse_grounding(md["response"]).boxes] == [b["label"] for b in md["boxes"]]
    assert md["prompt"] == prompt_for("markdown")
    assert free["response"] == ("A Title\n\nSecond paragraph.\n\n<table><tr><td>1</td></tr></table>\n\n$$x^2$$")
    assert "Running head" not in md["response"] and "ignored" not in md["response"]
    assert B.poly_to_box(_poly(0, 0, 1000, 2000), 1000, 2000) == [0, 0, 999, 999]
    with pytest.raises(B.BenchmarkFormatError, match="8 numbers"):
        B.poly_to_box([1, 2, 3], 10, 10)


def test_manifest_loader_resolves_images(synth_manifest):
    records = B.load_eval_records(synth_manifest, tasks=["markdown"])
    assert len(records) == 2 and all(r["task"] == "markdown" for r in records)
    assert all(Path(r["image"]).is_absolute() and Path(r["image"]).is_file() for r in records)


# --------------------------------------------------------------------------------- scoring


def test_score_record_perfect_and_plain_predictions(synth_manifest):
    md = next(r for r in B.load_manifest(synth_manifest) if r["task"] == "markdown")
    perfect = E.score_record(md, md["response"])
    assert perfect["edit_distance"] == 0.0 and perfect["f1"] == 1.0
    assert perfect["box_f1"] == 1.0 and perfect["box_mean_iou"] == 1.0 and perfect["box_gt_iou70"] == 1.0
    words = E.M.plain_text(md["response"])
    plain = E.score_record(md, words)  # right words, no markdown, no boxes
    assert plain["plain_edit_distance"] == 0.0
    assert plain["box_f1"] == 0.0 and plain["box_recall"] == 0.0
    free = next(r for r in B.load_manifest(synth_manifest) if r["task"] == "free")
    assert "box_f1" not in E.score_record(free, "anything")


def test_tesseract_tsv_parsing():
    tsv = "\n".join([
        "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext",
        "1\t1\t0\t0\t0\t0\t0\t0\t1000\t500\t-1\t",
        "2\t1\t1\t0\t0\t0\t100\t50\t400\t100\t-1\t",
        "5\t1\t1\t1\t1\t1\t100\t50\t80\t20\t95.0\tHello",
        "5\t1\t1\t1\t1\t2\t190\t50\t80\t20\t95.0\tworld",
        "5\t1\t1\t1\t2\t1\t100\t80\t80\t20\t95.0\tagain",
        "2\t1\t2\t0\t0\t0\t0\t250\t1000\t250\t-1\t",
        "5\t1\t2\t1\t1\t1\t0\t250\t80\t20\t90.0\tBye",
        "2\t1\t3\t0\t0\t0\t0\t0\t10\t10\t-1\t",  # an empty block (a picture) is dropped
        "5\t1\t3\t1\t1\t1\t0\t0\t10\t10\t-1\t ",
    ])
    texts, boxes = E.parse_tesseract_tsv(tsv)
    assert texts == ["Hello world\nagain", "Bye"]
    assert boxes == [(100, 100, 500, 300), (0, 500, 999, 999)]
    answer = E.tesseract_answer(texts, boxes, "markdown")
    assert [(b.label, b.box) for b in parse_grounding(answer).boxes] == [("text", boxes[0]), ("text", boxes[1])]
    assert E.tesseract_answer(texts, boxes, "free") == "Hello world\nagain\n\nBye"


def test_comparison_table_lists_systems_side_by_side():
    table = E.comparison_table({"model": {"edit_distance": 0.25, "pages_per_s": 3.0},
                                "tesseract": {"edit_distance": 0.125}}, ("edit_distance", "pages_per_s", "cer"))
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:4]] == ["metric", "model", "tesseract"]
    assert "| edit_distance | 0.2500 | 0.1250    |" in lines
    assert "| pages_per_s   | 3.0000 | —         |" in lines
    assert not any("cer" in ln for ln in lines)


# ------------------------------------------------------------------------------ end to end


def test_evaluate_tiny_checkpoint_end_to_end(ray_local, tiny_checkpoint, synth_manifest, mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    cfg = E.EvalConfig(data=str(synth_manifest), checkpoint=str(tiny_checkpoint), max_new_tokens=12,
                       batch_size=2, num_actors=1, experiment="eval-test", run_name="tiny",
                       tracking_uri=mlflow_uri, out_dir=str(tmp_path / "out"), n_render=1)
    report = E.evaluate(cfg)
    res = report.results["model"]
    assert res.metrics["n"] == 4.0 and res.metrics["errors"] == 0.0
    for key in ("edit_distance", "cer", "wer", "f1", "plain_edit_distance", "box_f1", "box_mean_iou",
                "markdown/edit_distance", "free/edit_distance", "markdown/box_f1", "pages_per_s", "line1_cer",
                "free/line1_cer", "free/paragraphs_equal"):
        assert key in res.metrics, key
    assert "free/box_f1" not in res.metrics
    assert 0.0 <= res.metrics["edit_distance"] <= 1.0
    # The actor pool's greedy outputs equal in-process generation on the same records.
    records = B.load_manifest(synth_manifest)
    direct = E.predict_images(tiny_checkpoint, [r["image"] for r in records], [r["prompt"] for r in records],
                              max_new_tokens=12)
    assert [r["prediction"] for r in res.rows] == [d["prediction"] for d in direct]
    assert all(r["n_tokens"] == 12 or r["finish_reason"] == "stop" for r in res.rows)

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["n"] == 4.0
    assert run.data.metrics["markdown/edit_distance"] == pytest.approx(res.metrics["markdown/edit_distance"])
    assert run.data.params["eval.max_new_tokens"] == "12" and run.data.params["checkpoint.mode"] == "tiny"
    assert run.data.tags["eval.system"] == "model"
    top = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"predictions", "predictions_table.json", "pages"} <= top
    assert {a.path for a in client.list_artifacts(res.run_id, "predictions")} >= {
        "predictions/predictions.jsonl", "predictions/metrics.json"}
    assert len(client.list_artifacts(res.run_id, "pages")) == 1
    local = Path(client.download_artifacts(res.run_id, "predictions/predictions.jsonl", str(tmp_path / "dl")))
    lines = [json.loads(x) for x in local.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in records]


def test_predictor_records_bad_inputs_without_failing_the_batch(tiny_checkpoint, synth_manifest, tmp_path):
    image = B.load_manifest(synth_manifest)[0]["image"]
    too_long = "<image>\n" + "The quick brown fox jumps over the lazy dog. " * 1000  # 11k tokens > 10240 positions
    out = E.predict_images(tiny_checkpoint, [image, str(tmp_path / "missing.png"), image],
                           [prompt_for("free"), prompt_for("free"), too_long], max_new_tokens=4)
    assert out[0]["error"] == "" and out[0]["n_tokens"] == 4
    assert out[1]["error"].startswith("image unreadable")
    assert out[2]["error"].startswith("generation failed") and "does not fit" in out[2]["error"]
    assert out[1]["prediction"] == out[2]["prediction"] == ""


@pytest.mark.skipif(not E.tesseract_available(), reason="tesseract binary not installed "
                    "(apt-get install -y tesseract-ocr)")
def test_job_runs_tesseract_beside_the_model(ray_local, tiny_checkpoint, synth_manifest, mlflow_uri, tmp_path,
                                             capsys):
    from mlflow import MlflowClient

    from jobs import evaluate as job

    rc = job.main(["--data", str(synth_manifest), "--tasks", "markdown", "--checkpoint", str(tiny_checkpoint),
                   "--baseline", "tesseract", "--max-new-tokens", "8", "--tracking-uri", mlflow_uri,
                   "--experiment", "eval-job", "--out", str(tmp_path / "out"), "--n-render", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| metric" in out and "tesseract" in out.split("| metric", 1)[1].splitlines()[0]
    summary = json.loads(out[out.rindex("\n{"):])
    assert set(summary["runs"]) == {"model", "tesseract"}
    tess = summary["metrics"]["tesseract"]
    assert tess["n"] == 2.0 and tess["pages_per_s"] > 0
    client = MlflowClient(tracking_uri=mlflow_uri)
    tess_run = client.get_run(summary["runs"]["tesseract"])
    # Clean, large synthetic text: Tesseract reads nearly every word and finds the blocks.
    assert tess_run.data.metrics["plain_f1"] > 0.8
    assert tess_run.data.metrics["box_any_f1"] > 0.3
    assert tess_run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
    parent = client.get_run(summary["parent_run_id"])
    assert "tesseract/plain_f1" in parent.data.metrics and "model/plain_f1" in parent.data.metrics
    assert "comparison.md" in {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert [c.strip() for c in table.splitlines()[0].split("|")[1:4]] == ["metric", "model", "tesseract"]
    ed = next(ln for ln in table.splitlines() if ln.startswith("| edit_distance "))
    assert float(ed.split("|")[3]) == pytest.approx(tess_run.data.metrics["edit_distance"], abs=1e-4)


def test_missing_tesseract_is_skipped_with_a_message(synth_manifest, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract binary on this PATH
    messages = []
    report = E.evaluate(E.EvalConfig(data=str(synth_manifest), baseline="tesseract", log_mlflow=False,
                                     out_dir=str(tmp_path)), progress=messages.append)
    assert report.results == {} and "tesseract" in report.skipped
    assert "apt-get install -y tesseract-ocr" in messages[0]


# ---------------------------------------------------------------------- fixed test images


def test_committed_test_images_match_expected_json():
    from jobs.vision_sample import load_expected

    entries = load_expected(TEST_IMAGES)
    assert len(entries) == 9
    assert sum(f.stat().st_size for f in TEST_IMAGES.iterdir()) < 2 * 1024 * 1024
    assert {e["task"] for e in entries} == {"markdown", "free", "line"}
    for e in entries:
        assert e["prompt"] == prompt_for("free" if e["task"] == "line" else e["task"])
        if e["task"] == "markdown":
            parsed = [{"label": b.label, "box": list(b.box)} for b in parse_grounding(e["expected"]).boxes]
            assert parsed == e["boxes"]


def test_vision_sample_prints_expected_and_generated(tiny_checkpoint, capsys):
    from jobs import vision_sample as vs

    assert vs.similarity("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nabc", "abc") == 1.0
    assert vs.similarity("abd", "abc") == pytest.approx(2 / 3)
    assert vs.main(["--checkpoint", str(tiny_checkpoint), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("EXPECTED:") == 9 and out.count("GENERATED:") == 9 and out.count("similarity: ") == 9
    assert "Cheese from the High Pastures" in out  # the text-line crop's expected text
    assert "mean similarity over 9 images" in out


def test_make_test_images_writes_a_complete_set(tmp_path):
    from jobs import vision_sample as vs

    path = vs.make_test_images(tmp_path)
    entries = vs.load_expected(tmp_path)
    assert path.name == "expected.json" and len(entries) == len(vs.TEST_IMAGE_SPECS)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(s[5] for s in vs.TEST_IMAGE_SPECS)
