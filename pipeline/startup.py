"""Where a training stage's time goes before its first step.

Why: on a lent GPU the minutes before step 1 (Ray Train's workers, building or restoring the model,
the data stream's first batch, compiling) cost as much as the steps themselves: a resumed tier-2 call
spent ~120 s of its ~540 s there (bench/RESULTS.md, session 24), and nothing said which part. Each
worker marks the phases as it passes them; rank 0 prints them once and logs them to MLflow as
``startup_<phase>_s`` at the call's first step, so a resumed run has one point per call.
"""

from __future__ import annotations

import time

# in the order a worker passes them; "workers" is from the driver's submit to the worker function's start
# (after a worker failure, the restarted group's count still starts at that submit)
PHASES = ("workers", "model", "first_batch", "first_step")
METRICS = tuple(f"startup_{phase}_s" for phase in (*PHASES, "total"))  # as logged to MLflow


class StartupClock:
    """Wall-clock marks of the startup phases of one worker (``time.time()``, so the driver's submit
    time from another process counts; on a cluster that includes the nodes' clock skew)."""

    def __init__(self, submitted_unix_s: float | None = None, now: float | None = None) -> None:
        self.submitted = submitted_unix_s
        self.started = time.time() if now is None else now
        self.marks: dict[str, float] = {}

    def mark(self, phase: str, now: float | None = None) -> None:
        """The end of ``phase``; the first mark of a phase counts, later ones are ignored."""
        if phase not in PHASES[1:]:
            raise ValueError(f"unknown startup phase {phase!r}; one of {PHASES[1:]}")
        self.marks.setdefault(phase, time.time() if now is None else now)

    def done(self, phase: str) -> bool:
        return phase in self.marks

    def seconds(self) -> dict[str, float]:
        """Each marked phase's own duration (a phase not marked is left out, and the next one
        counts from the last mark before it), plus ``total`` from the submit (or the worker's start)."""
        out: dict[str, float] = {}
        if self.submitted is not None:
            out["workers"] = max(0.0, self.started - self.submitted)
        last = self.started
        for phase in PHASES[1:]:
            if phase in self.marks:
                out[phase] = self.marks[phase] - last
                last = self.marks[phase]
        out["total"] = last - (self.submitted if self.submitted is not None else self.started)
        return out

    def metrics(self) -> dict[str, float]:
        return {f"startup_{k}_s": v for k, v in self.seconds().items()}

    def text(self) -> str:
        parts = self.seconds()
        total = parts.pop("total")
        return f"{total:.1f} s before the first step (" + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + ")"
