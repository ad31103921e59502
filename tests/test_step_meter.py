"""StepMeter: a step's values stay on the device until a report reads them, throughput over the window."""

import time

import pytest
import torch

from pipeline.step_meter import StepMeter


def test_reads_values_and_measures_the_window():
    meter = StepMeter(world=2)
    for _ in range(3):
        meter.add(tokens=100, samples=4, data_wait_s=0.5, flops=1e9)
    time.sleep(0.05)
    out = meter.read({"loss": torch.tensor(2.5), "grad_norm": torch.tensor([1.25])[0], "lr": 0.1})
    assert out["loss"] == 2.5 and out["grad_norm"] == 1.25 and out["lr"] == 0.1
    assert all(type(v) is float for v in out.values())
    assert out["data_wait_s"] == pytest.approx(0.5)  # the mean per step of the window
    window_s = 600 / out["tokens_per_s"]  # 3 steps x 100 tokens x 2 ranks
    assert 0.05 <= window_s < 5
    assert out["samples_per_s"] == pytest.approx(out["tokens_per_s"] * 24 / 600)
    assert out["flops_per_s"] == pytest.approx(out["tokens_per_s"] * 6e9 / 600)  # 3 steps x 1e9 x 2 ranks

    meter.add(tokens=10, samples=1, data_wait_s=0.0)  # a new window: only this step counts
    again = meter.read({})
    assert again["data_wait_s"] == 0.0 and 20 / again["tokens_per_s"] < window_s
    assert "flops_per_s" not in again  # steps that did not count their FLOPs report none
    assert meter.read({})["tokens_per_s"] == 0.0  # an empty window
