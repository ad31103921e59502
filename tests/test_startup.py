"""The startup clock's arithmetic: each phase's own seconds, whatever was not marked."""

from __future__ import annotations

import pytest

from pipeline.startup import StartupClock


def test_each_phase_counts_from_the_mark_before_it():
    clock = StartupClock(submitted_unix_s=100.0, now=130.0)
    clock.mark("model", now=142.0)
    clock.mark("first_batch", now=150.0)
    clock.mark("first_batch", now=999.0)  # every step marks it: the first counts
    clock.mark("first_step", now=240.0)
    assert clock.seconds() == {"workers": 30.0, "model": 12.0, "first_batch": 8.0, "first_step": 90.0,
                               "total": 140.0}
    assert clock.metrics()["startup_first_step_s"] == 90.0
    assert clock.text() == ("140.0 s before the first step (workers 30.0 s, model 12.0 s, first_batch 8.0 s, "
                            "first_step 90.0 s)")


def test_a_phase_not_marked_folds_into_the_next_and_no_submit_time_counts_from_the_worker():
    clock = StartupClock(now=10.0)
    clock.mark("model", now=15.0)
    assert not clock.done("first_step")
    clock.mark("first_step", now=40.0)  # no first_batch mark: its time is in first_step's
    assert clock.done("first_step")
    assert clock.seconds() == {"model": 5.0, "first_step": 25.0, "total": 30.0}


def test_an_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown startup phase 'compile'"):
        StartupClock().mark("compile")
