"""The trainer's step profiler (pipeline/profiling.py) on a small CPU loop."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from pipeline.profiling import StepProfiler, phase
from pipeline.train import load_train_config


def _loop(profiler: StepProfiler, steps: int) -> list:
    x = torch.randn(64, 64, requires_grad=True)
    outputs = []
    for step in range(steps):
        profiler.before(step)
        with phase("forward"):
            loss = (x @ x).square().mean()
        with phase("backward"):
            loss.backward()
        outputs.append(profiler.after(step))
    return outputs


def test_profiles_exactly_the_asked_steps_and_reports_the_phases():
    profiler = StepProfiler(2, 3, torch.device("cpu"))
    outputs = _loop(profiler, 8)
    assert [o is not None for o in outputs] == [False] * 4 + [True] + [False] * 3  # written after step 4
    out = outputs[4]
    trace = json.loads(gzip.open(out / "trace.json.gz").read())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"ndocr.forward", "ndocr.backward"} <= names
    s = profiler.summary
    assert s.steps == 3 and s.device_ms == 0 and set(s.phases_ms) == {"forward", "backward"}
    assert 0 < s.phases_ms["forward"] < s.wall_ms
    assert (out / "report.txt").read_text() == s.report and s.report.startswith("steps 2..4:")
    assert "aten::mm" in s.report
    assert set(s.metrics()) == {"profile_step_ms", "profile_forward_ms", "profile_backward_ms"}
    shutil.rmtree(out)  # the caller owns the profile's folder (the trainer uploads, then removes it)


def test_no_start_profiles_nothing_and_bad_ranges_are_refused():
    profiler = StepProfiler(None, 5, torch.device("cpu"))
    assert _loop(profiler, 3) == [None] * 3 and profiler.summary is None
    with pytest.raises(ValueError, match="start >= 0"):
        StepProfiler(-1, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="steps >= 1"):
        StepProfiler(0, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="within the run's 10 steps"):
        load_train_config(None, steps=10, profile_at=8, profile_steps=5)


def test_a_loop_that_ends_inside_the_profile_closes_it_and_writes_nothing():
    profiler = StepProfiler(1, 5, torch.device("cpu"))
    assert _loop(profiler, 3) == [None] * 3
    profiler.close()
    assert profiler.summary is None
    out = _loop(StepProfiler(0, 1, torch.device("cpu")), 1)[0]
    assert out is not None  # a new profile starts cleanly
    shutil.rmtree(out)
