"""The GPU benchmarks' ``--quick`` smoke runs on the CPU: tiny presets through the same code paths.

The numbers mean nothing here; what is checked is that each script still runs end to end and
prints its table (a benchmark that has rotted is found on the GPU machine, where time is short).
Nothing is appended to bench/RESULTS.md (``--results ''``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script, args, header", [
    ("decode.py", ["--check"], "| batch | path | TTFT ms |"),
    ("train_step.py", [], "| preset | batch | attention | step ms |"),
    ("encoder.py", [], "| mode | batch | images/s |"),
    ("pages.py", ["--ngram"], "| pages x tokens |"),  # with the default n-gram blocker
    # SAM's and CLIP's blocks compiled one by one through inductor (the loss read every 2nd step)
    ("glyph_step.py", ["--variants", "eager,blocks/read2"], "| compile_vision by block | 2 |"),
])
def test_benchmark_quick_run_prints_its_table(script, args, header, tmp_path):
    raw = tmp_path / "raw.jsonl"
    proc = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--results", "", "--json", str(raw),
                           *args], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert header in proc.stdout
    assert raw.read_text().strip()  # the raw numbers went to --json


def test_trainer_input_bench_times_the_data_threads_parts():
    """bench/trainer_input.py (a CPU benchmark) on a few tiny rows: every part of the path gets a row."""
    proc = subprocess.run([sys.executable, "trainer_input.py", "--rows", "24", "--mode", "tiny", "--tokens", "64",
                           "--seq-len", "256"], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = proc.stdout[proc.stdout.index("| part | ms per row | ms per step |"):]
    assert all(f"| {part} |" in table for part in ("rows", "row_to_sample", "batches", "total"))


def test_tier2_micro_runs_its_slot_targets(tmp_path):
    """bench/tier2_micro.py at toy size: the bag (-aux) and in-place (-grid) slot targets each train
    and read, and a variant asking for both is refused."""
    import json

    proc = subprocess.run([sys.executable, "tier2_micro.py", "--variants", "line-deep-center-grid-patch,line-deep-aux",
                           "--steps", "2", "--batch-size", "4", "--workers", "0", "--size", "128",
                           "--out", str(tmp_path)], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| slot patches wrong (-grid) | CER |" in proc.stdout
    grid, bag = json.loads((tmp_path / "micro.json").read_text())
    assert 0 <= grid["final_grid_wrong"] <= 1 and grid["final_aux_loss"] > 0 and bag["final_grid_wrong"] is None
    refused = subprocess.run([sys.executable, "tier2_micro.py", "--variants", "line-deep-aux-grid", "--out",
                              str(tmp_path)], cwd=BENCH, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "pick one" in refused.stderr


def test_tier2_summary_keeps_the_recipe_curves_and_evaluation(tmp_path, new_mlflow_store):
    """bench/tier2_summary.py on a real MLflow store: the curves (grad-norm parts included), the
    recipe with its notes, the evaluation and a baseline, and the PNG."""
    import json

    from mlflow.tracking import MlflowClient

    uri = new_mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t2")).info.run_id
    client.log_param(run_id, "train.glyph_cell", "grid")
    for step in (25, 50):
        for key, value in {"loss": 3.0 / step, "grad_norm": 2.0, "grad_norm_gpt": 1.5, "glyph_cell_error": 0.1,
                           "mfu": 0.16, "data_wait_s": 0.05}.items():
            client.log_metric(run_id, key, value, step=step)
    for step, (model, first_step) in {1: (20.0, 150.0), 26: (12.0, 60.0)}.items():  # two calls' starts
        client.log_metric(run_id, "startup_model_s", model, step=step)
        client.log_metric(run_id, "startup_first_step_s", first_step, step=step)
    client.log_metric(run_id, "ended_early_at_step", 50, step=50)  # its time limit ended the stage
    client.set_terminated(run_id)
    evals, baseline = tmp_path / "summary.json", tmp_path / "tess.json"
    evals.write_text(json.dumps({"heldout": {"cer": 0.7, "free/cer": 0.72, "not_kept": 1.0}}))
    baseline.write_text(json.dumps({"tesseract": {"cer": 0.03}}))
    proc = subprocess.run([sys.executable, "tier2_summary.py", "--tracking-uri", uri, "--run-id", run_id,
                           "--eval-summary", str(evals), "--baseline", str(baseline), "--device", "cpu",
                           "--note", "steps=50 (one call)", "--out", str(tmp_path / "run")],
                          cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run_run_summary.json").read_text())
    assert summary["recipe"] == {"train.glyph_cell": "grid", "steps": "50 (one call)"}
    assert summary["curves"]["grad_norm_gpt"] == {"25": 1.5, "50": 1.5}
    assert summary["curves"]["loss"] == {"25": 0.12, "50": 0.06}
    assert summary["curves"]["mfu"] == {"25": 0.16, "50": 0.16} and summary["curves"]["data_wait_s"]["50"] == 0.05
    assert summary["final"]["glyph_cell_error"] == 0.1 and summary["ended_at_step"] == 50
    assert summary["startup"] == {"model": {"1": 20.0, "26": 12.0}, "first_step": {"1": 150.0, "26": 60.0}}
    assert summary["eval"] == {"heldout": {"cer": 0.7, "free/cer": 0.72}}
    assert summary["eval_tesseract_heldout"] == {"cer": 0.03}
    assert (tmp_path / "run_curves.png").stat().st_size > 10_000


def test_tier2_lines_places_the_errors_on_the_pages_visual_lines(tmp_path):
    """bench/tier2_lines.py on pages drawn again from a speedrun config: an exact reading has no
    error in any row; a reading that loses a paragraph after its first visual line has every
    error from row 2 on."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("tier2_lines", BENCH / "tier2_lines.py")
    tier2_lines = importlib.util.module_from_spec(spec)  # loaded by path: bench/ stays off sys.path
    spec.loader.exec_module(tier2_lines)
    from pipeline.synth import SynthConfig, make_page

    def long_paragraph(page) -> str | None:
        return next((b.text for b in page.blocks if b.label == "text" and len(b.text) > 120), None)

    page = next(p for p in (make_page(i, SynthConfig.reading(tasks=("free",)), 1, "heldout") for i in range(20))
                if long_paragraph(p))
    reference = page.plain_text
    exact = tier2_lines.visual_line_errors(page, reference, reference)
    assert exact and all(errors == 0 for _, _, errors, _ in exact)
    assert len(exact) == sum(1 for p in page.lines if p.text.strip())
    paragraph = long_paragraph(page)
    first_line = next(p.text.strip() for p in page.lines if paragraph.startswith(p.text.strip()))
    lost = reference.replace(paragraph, first_line + " and then some text of its own")
    rows = tier2_lines.visual_line_errors(page, reference, lost)
    assert all(errors == 0 for place, _, errors, _ in rows if place == 0)
    assert sum(errors for place, _, errors, _ in rows if place > 0) > 0

    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(json.dumps({"id": f"{page.page_id}-free", "task": "free", "reference": reference,
                                       "prediction": lost, "error": ""}) + "\n")
    config = tmp_path / "speedrun.yaml"
    config.write_text("synth_profile: reading\nseed: 0\ntasks: [free]\n")
    proc = subprocess.run([sys.executable, "tier2_lines.py", "--config", str(config), "--predictions",
                           str(predictions), "--split", "heldout"], cwd=BENCH, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| visual line of its paragraph | lines | chars | CER |" in proc.stdout
    paragraph_rows = {line.split("|")[1].strip(): float(line.split("|")[4])
                      for line in proc.stdout.split("| visual line of the page |")[0].splitlines()
                      if line.startswith("| ") and line.split("|")[1].strip()[:1].isdigit()}
    assert paragraph_rows["1"] == 0.0 and paragraph_rows["2"] > 0.3
    assert "word 4-grams read: " in proc.stdout

    from pipeline.synth import load_corpus

    learnt = max(load_corpus("train").sentences, key=len)  # a reading that recites a training sentence
    grams = len(tier2_lines.word_ngrams(learnt, 4))
    assert grams > 0
    assert tier2_lines.recited_ngrams([{"reference": reference, "prediction": learnt}], 4)[::2] == (grams, grams)
    assert tier2_lines.recited_ngrams([{"reference": learnt, "prediction": learnt}], 4) == (grams, grams, 0)


def test_stream_bench_times_each_crop_scale():
    """bench/stream.py at toy size: one row of its table per crop scale of a crop task, one for a page task."""
    proc = subprocess.run([sys.executable, "stream.py", "--tasks", "line,free", "--crops", "2", "--crop-scales",
                           "crop,zoom", "--pages", "2", "--mode", "tiny"], cwd=BENCH, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| line", "| free"))]
    assert [row.split("|")[1:4] for row in rows] == [[" line ", " 2 ", " crop "], [" line ", " 2 ", " zoom "],
                                                     [" free ", " 1 ", "  "]], proc.stdout


def test_tier2_compare_puts_committed_runs_side_by_side():
    """bench/tier2_compare.py on the committed records that bench/RESULTS.md (session 26) quotes."""
    proc = subprocess.run([sys.executable, "tier2_compare.py", "zoom_3000", "zoom_pages_1400", "zoom_pages_2576",
                           "--curves", "loss",
                           "--windows", "1200-1400,2800-3000"], cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "| zoom_pages_1400 | 1400 | line 0.3, free 0.35, markdown 0.35 | 0.743 | 0.700 | 36.6% |" in out
    assert "| Tesseract (same held-out pages) | - | - | 0.032 |" in out
    assert "| zoom_pages_2576 | 2576 of 3000 | line 0.3, free 0.35, markdown 0.35 | 0.314 |" in out
    assert "| loss | zoom_3000 | 2.74 | 0.646 |" in out and "| loss | zoom_pages_1400 | 3.31 | - |" in out
    bad = subprocess.run([sys.executable, "tier2_compare.py", "zoom_3000", "--windows", "400-200"], cwd=BENCH,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "is not FIRST-LAST" in bad.stderr
    missing = subprocess.run([sys.executable, "tier2_compare.py", "no_such_run"], cwd=BENCH, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 1 and "no run record 'no_such_run'" in missing.stderr


def test_stream_mix_splits_a_steps_flops_and_loss_tokens_by_task(tmp_path):
    """bench/stream_mix.py on a tiny stream recipe: each column of shares adds up to the whole, and a
    line crop (one view for one line) carries fewer loss tokens per row and per FLOP than a page."""
    config = tmp_path / "speedrun.yaml"
    config.write_text("preset: tiny\nmode: tiny\nsynth_profile: reading\nseed: 0\nvocab_size: 300\n"
                      "max_seq_len: 1024\nstream_pages: 100\nstream_tasks: {line: 0.5, free: 0.5}\n"
                      "stream_crops_per_page: 4\n")
    proc = subprocess.run([sys.executable, "stream_mix.py", "--config", str(config), "--pages", "8",
                           "--tokenizer-pages", "8"], cwd=BENCH, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                              for line in proc.stdout.splitlines() if line.startswith("| ")
                                              and not line.startswith("| task"))}
    assert set(rows) == {"line", "free"}, proc.stdout
    for column in (1, 2, 3):  # shares of rows, FLOPs, loss tokens
        assert abs(sum(float(r[column].rstrip("%")) for r in rows.values()) - 100) < 0.3, proc.stdout
    assert int(rows["line"][0]) > int(rows["free"][0])  # up to 4 crops a line page
    for r in rows.values():  # the loss is on the response: not the image's tokens, nor the prompt's
        assert 0 < float(r[6]) < float(r[4]) - float(r[5]), proc.stdout
    assert float(rows["line"][6]) < float(rows["free"][6]) and float(rows["line"][8]) < float(rows["free"][8])
    no_stream = tmp_path / "pages.yaml"
    no_stream.write_text("preset: tiny\n")
    refused = subprocess.run([sys.executable, "stream_mix.py", "--config", str(no_stream)], cwd=BENCH,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "does not train on the stream" in refused.stderr


def test_layout_shift_compares_the_splits_line_pitch_and_scores_readings_by_it(tmp_path):
    """bench/layout_shift.py: both splits' line pitch and gaps, and readings grouped by pitch. A reading that
    splits its page's paragraph at a wrap counts as a wrong paragraph count; an exact one does not."""
    import json

    sys.path.insert(0, str(BENCH))
    import layout_shift
    from pipeline.synth import SynthConfig, make_page

    assert layout_shift.cap_heights_per_line_box("stix") > 2 > layout_shift.cap_heights_per_line_box("sans") > 1.5
    records, scored, wrong = [], 0, 0
    for index in range(6):  # the recipe's held-out pages: its overrides are all for training pages
        page = make_page(index, SynthConfig.reading(), 1, "heldout")
        lines = layout_shift.paragraph_lines(page)
        assert all(a[1] < b[1] for para in lines for a, b in zip(para, para[1:]))  # top to bottom
        split = page.plain_text.replace(" ", "\n\n", 1) if index % 2 else page.plain_text
        records.append({"id": f"{page.page_id}-free", "task": "free", "reference": page.plain_text,
                        "prediction": split})
        if layout_shift.pitch_in_cap_heights(page) is not None:  # a paragraph of two lines: the page is scored
            scored += 1
            wrong += index % 2
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = str(BENCH.parent / "jobs/configs/speedrun_tier2_spaced.yaml")
    proc = subprocess.run([sys.executable, "layout_shift.py", "--config", config, "--pages", "3", "--predictions",
                           str(predictions), "--split", "heldout"], cwd=BENCH, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| train | 3 |" in proc.stdout and "| heldout | 3 |" in proc.stdout
    thirds = [line.split("|") for line in proc.stdout.splitlines() if "third |" in line]
    assert sum(int(row[2]) for row in thirds) == scored >= 3 and wrong >= 1
    assert round(sum(int(row[2]) * float(row[4].strip().rstrip("%")) / 100 for row in thirds)) == wrong
    refused = subprocess.run([sys.executable, "layout_shift.py", "--config", config, "--split", "heldout"],
                             cwd=BENCH, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "go together" in refused.stderr
