"""Rank 0's MLflow logging from the train loop: off the training thread, in order, errors not lost."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.train import _Tracker


def test_metrics_arrive_in_order_after_flush(mlflow_uri):
    run_id = tracking.start_run("test-tracker", run_name="t", tracking_uri=mlflow_uri)
    tracker = _Tracker(run_id, mlflow_uri, rank=0)
    for step in range(1, 21):
        tracker.log({"loss": 1.0 / step, "tokens_per_s": 100.0 * step}, step)
    tracker.flush()
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")
    assert [m.step for m in history] == list(range(1, 21))
    assert [m.value for m in history] == pytest.approx([1.0 / s for s in range(1, 21)])


def test_other_ranks_log_nothing(mlflow_uri):
    run_id = tracking.start_run("test-tracker", run_name="t", tracking_uri=mlflow_uri)
    tracker = _Tracker(run_id, mlflow_uri, rank=1)
    tracker.log({"loss": 1.0}, 1)
    tracker.flush()
    assert MlflowClient(mlflow_uri).get_metric_history(run_id, "loss") == []


def test_a_logging_error_is_raised_not_dropped(mlflow_uri):
    tracker = _Tracker("0" * 32, mlflow_uri, rank=0)  # no such run in this store
    tracker.log({"loss": 1.0}, 1)
    with pytest.raises(Exception, match="(?i)run"):
        tracker.flush()
