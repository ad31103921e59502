"""MLflow helpers and run comparison on real runs in a SQLite store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from pipeline import tracking



def _two_runs(uri: str) -> tuple[str, str, str]:
    """Runs 'a' and 'b' (lr and optimizer differ, steps equal) plus 'other' with another tag."""
    ids = []
    for name, lr, opt, scale in (("a", 0.1, "adamw", 1.0), ("b", 0.2, "muon", 0.5)):
        run = tracking.start_run("cmp", run_name=name, tags={"sweep": "lr"}, tracking_uri=uri)
        tracking.log_params_flat(run, {"train": {"lr": lr, "steps": 3, "optimizer": opt}, "preset": "tiny"},
                                 tracking_uri=uri)
        for step in range(3):
            tracking.log_metrics(run, {"loss": scale * (3 - step), "lr": lr}, step=step, tracking_uri=uri)
        tracking.log_metrics(run, {"eval/edit_distance": 0.5 * scale}, step=2, tracking_uri=uri)
        tracking.end_run(run, tracking_uri=uri)
        ids.append(run)
    other = tracking.start_run("cmp", run_name="other", tags={"sweep": "none"}, tracking_uri=uri)
    tracking.log_params_flat(other, {"train": {"lr": 9.0}}, tracking_uri=uri)
    tracking.end_run(other, tracking_uri=uri)
    return ids[0], ids[1], other


def test_compare_lists_differing_params_final_metrics_and_plots(mlflow_uri, tmp_path):
    a, b, other = _two_runs(mlflow_uri)
    cmp = tracking.compare_runs(experiment="cmp", tag="sweep=lr", tracking_uri=mlflow_uri)
    assert [r.run_id for r in cmp.runs] == [a, b]  # 'other' filtered out by its tag
    assert set(cmp.differing_params) == {"train.lr", "train.optimizer"}  # steps and preset are equal
    assert cmp.differing_params["train.lr"] == {a: "0.1", b: "0.2"}
    assert cmp.runs[0].metrics["loss"] == 1.0 and cmp.runs[1].metrics["loss"] == 0.5  # final values
    table = cmp.table()
    lines = table.splitlines()
    assert lines[0].split("|")[2].strip() == "a" and lines[0].split("|")[3].strip() == "b"
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in lines[2:]}
    assert row["param: train.lr"] == ["0.1", "0.2"]
    assert row["param: train.optimizer"] == ["adamw", "muon"]
    assert "param: train.steps" not in row
    assert row["metric: loss"] == ["1", "0.5"]
    assert row["metric: eval/edit_distance"] == ["0.5", "0.25"]
    csv = cmp.table(fmt="csv").splitlines()
    assert csv[0] == ",a,b" and "param: train.lr,0.1,0.2" in csv

    png = tracking.plot_curves(cmp, tmp_path / "curves.png", metrics=["loss", "lr"], tracking_uri=mlflow_uri)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    hist = tracking.metric_histories(cmp, ["loss"], tracking_uri=mlflow_uri)
    assert hist["loss"][b] == [(0, 1.5), (1, 1.0), (2, 0.5)]


def test_compare_job_by_run_ids_logs_table_and_png(mlflow_uri, tmp_path, capsys):
    from mlflow import MlflowClient

    from jobs import compare

    a, b, _ = _two_runs(mlflow_uri)
    target = tracking.start_run("reports", run_name="report", tracking_uri=mlflow_uri)
    png = tmp_path / "plots" / "curves.png"
    rc = compare.main(["--run-ids", a, b, "--tracking-uri", mlflow_uri, "--plot", str(png),
                       "--out", str(tmp_path / "table.md"), "--log-to", target, "--metrics", "loss"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "param: train.lr" in out and "metric: loss" in out and "metric: lr " not in out
    assert png.is_file() and (tmp_path / "table.md").read_text().startswith("| ")
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert {x.path for x in client.list_artifacts(target, "compare")} == {"compare/table.md", "compare/curves.png"}


def test_log_params_flat_batches_and_truncates(mlflow_uri):
    from mlflow import MlflowClient

    run = tracking.start_run("params", run_name="p", tracking_uri=mlflow_uri)
    params = {"many": {f"p{i:03d}": i for i in range(250)}, "long": "x" * 900,
              "nested": {"tuple": (1, 2), "none": None, "deep": {"er": True}}}
    logged = tracking.log_params_flat(run, params, tracking_uri=mlflow_uri)
    got = MlflowClient(tracking_uri=mlflow_uri).get_run(run).data.params
    assert len(got) == 254 and got == logged
    assert len(got["long"]) == tracking.PARAM_VALUE_LIMIT and got["long"].endswith("...")
    assert got["many.p249"] == "249" and got["nested.tuple"] == "[1, 2]"
    assert got["nested.none"] == "None" and got["nested.deep.er"] == "True"
    tracking.log_params_flat(run, {"many": {"p000": 0}}, tracking_uri=mlflow_uri)  # same value: accepted


def test_runs_nesting_metrics_artifacts_and_registry(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    parent = tracking.start_run("reg", run_name="pipeline", tracking_uri=mlflow_uri)
    child = tracking.start_run("reg", run_name="stage1", tags={"stage": 1}, parent_run_id=parent,
                               tracking_uri=mlflow_uri)
    logged = tracking.log_metrics(child, {"loss": 2.5, "bad key(x)": 1, "skip": None, "text": "nope"},
                                  step=7, tracking_uri=mlflow_uri)
    assert logged == {"loss": 2.5, "bad key_x_": 1.0}
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "w.bin").write_bytes(b"123")
    tracking.log_artifact(child, ckpt, "model", tracking_uri=mlflow_uri)
    tracking.log_artifact(child, ckpt / "config.json", tracking_uri=mlflow_uri)
    with pytest.raises(FileNotFoundError):
        tracking.log_artifact(child, tmp_path / "missing", tracking_uri=mlflow_uri)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    tracking.log_figure(child, fig, "plots/curve.png", tracking_uri=mlflow_uri)
    plt.close(fig)
    tracking.log_image(child, Image.new("RGB", (8, 8), (255, 0, 0)), "pages/red.png", tracking_uri=mlflow_uri)
    assert tracking.register_model(child, "model", "tiny-ocr", tracking_uri=mlflow_uri) == "1"
    assert tracking.register_model(child, "model", "tiny-ocr", tracking_uri=mlflow_uri) == "2"
    tracking.end_run(child, status="FAILED", tracking_uri=mlflow_uri)

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(child)
    assert run.info.status == "FAILED" and run.info.run_name == "stage1"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["stage"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(child, "loss")] == [(7, 2.5)]
    assert {a.path for a in client.list_artifacts(child, "model")} == {"model/config.json", "model/sub"}
    assert {"config.json", "plots", "pages"} <= {a.path for a in client.list_artifacts(child)}
    red = Path(client.download_artifacts(child, "pages/red.png", str(tmp_path / "dl")))
    with Image.open(red) as im:
        assert im.getpixel((0, 0)) == (255, 0, 0)
    mv = client.get_model_version("tiny-ocr", "2")
    assert mv.run_id == child and mv.source.endswith("/model")
    # Artifacts live beside the SQLite database, not in ./mlruns of the working directory.
    db_dir = Path(mlflow_uri[len("sqlite:///"):]).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlartifacts").as_uri())


def test_tracking_uri_default_and_refusals(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'artifacts' / 'mlflow.db'}"
    assert (tmp_path / "artifacts").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri() == "http://mlflow:5000"
    with pytest.raises(ValueError, match="file store is refused"):
        tracking.client("file:///tmp/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    under_artifacts = (tmp_path / "artifacts" / "mlruns").as_uri()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    raw = MlflowClient(tracking_uri=under_artifacts)  # what the refusal below spares a user
    with pytest.raises(MlflowException, match="not found"):
        raw.create_run(raw.create_experiment("x"), tags={"a": "b"})
    with pytest.raises(ValueError, match="folder named 'artifacts'"):
        tracking.client(under_artifacts)
    with pytest.raises(ValueError, match="folder named 'artifacts'"):
        tracking.client("artifacts/mlruns")  # relative to the working directory
    elsewhere = (tmp_path / "mlruns").as_uri()
    run_id = tracking.start_run("x", run_name="r", tracking_uri=elsewhere)
    assert tracking.client(elsewhere).get_run(run_id).info.run_name == "r"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    with pytest.raises(ValueError, match="nested=True"):
        tracking.start_run("x", nested=True, tracking_uri="sqlite:///" + str(tmp_path / "n.db"))
    assert tracking.flatten({"a": {"b": {"c": 1}}, "d": []}) == {"a.b.c": 1, "d": []}
    commit = tracking.git_commit()
    assert commit == "unknown" or len(commit) == 40


def test_panels_that_span_decades_go_on_a_log_axis():
    assert tracking.spans_decades([5.0, 30.0, 2e9])  # a grad norm with spikes
    assert not tracking.spans_decades([0.5, 3.0, 40.0])
    assert not tracking.spans_decades([0.0, 1.0, 1e6])  # a zero: not on a log axis
    assert not tracking.spans_decades([-1.0, 1e6]) and not tracking.spans_decades([])
    assert tracking.spans_decades([1.0, math.inf, 1e4]) and not tracking.spans_decades([math.nan, 1.0])
