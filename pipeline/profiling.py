"""A few of the trainer's own steps under ``torch.profiler``: where a step's time goes.

Why: a step in the trainer can be slower than the same step in a benchmark (the data path, host
syncs, the prefetch thread competing for the GIL), and only a trace of real steps says which.
The trainer marks its phases with :func:`phase`; :class:`StepProfiler` records steps
``[start, start + steps)`` and writes a Chrome trace (open it in Perfetto) and a short report:
wall time per step, how much of it the device was busy, the host-side phases, and the top ops.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PHASE_PREFIX = "ndocr."


def phase(name: str) -> record_function:
    """A labelled span of the train loop (free when no profiler runs)."""
    return record_function(PHASE_PREFIX + name)


@dataclass
class ProfileSummary:
    steps: int
    wall_ms: float  # per step
    device_ms: float  # kernels and copies per step (0 on the CPU)
    phases_ms: dict[str, float]  # host time per step in each labelled phase
    report: str  # the text written beside the trace

    def metrics(self) -> dict[str, float]:
        """For MLflow: what one profiled step cost and how busy the device kept."""
        out = {"profile_step_ms": self.wall_ms}
        if self.device_ms:
            out["profile_device_ms"] = self.device_ms
            out["profile_device_busy"] = min(1.0, self.device_ms / self.wall_ms)
        out.update({f"profile_{k}_ms": v for k, v in self.phases_ms.items()})
        return out


class StepProfiler:
    """Profile steps ``[start, start + steps)`` of a loop; a no-op when ``start`` is None.

    Call :meth:`before` at the top of each step and :meth:`after` at its end; :meth:`after`
    returns the output directory (trace + report) once the last profiled step ends.
    """

    def __init__(self, start: int | None, steps: int, device: torch.device) -> None:
        if start is not None and (start < 0 or steps < 1):
            raise ValueError(f"profile from step {start} for {steps} steps: need start >= 0 and steps >= 1")
        self.start, self.steps, self.device = start, steps, device
        self._prof: profile | None = None
        self._t0 = 0.0
        self.summary: ProfileSummary | None = None

    def before(self, step: int) -> None:
        if self.start is None or step != self.start or self._prof is not None or self.summary is not None:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)
        self._prof = profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after(self, step: int) -> Path | None:
        """After step ``step`` (the loop's counter before it is advanced)."""
        if self._prof is None or step < self.start + self.steps - 1:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        out = Path(tempfile.mkdtemp(prefix="ndocr-profile-"))
        prof.export_chrome_trace(str(out / "trace.json.gz"))  # torch gzips a .gz path itself
        self.summary = summarize(prof, self.steps, wall, step - self.steps + 1)
        (out / "report.txt").write_text(self.summary.report)
        return out

    def close(self) -> None:
        """Stop a profile the loop left unfinished (it ended first), writing nothing."""
        if self._prof is not None:
            prof, self._prof = self._prof, None
            prof.__exit__(None, None, None)


def summarize(prof: profile, steps: int, wall_s: float, first_step: int) -> ProfileSummary:
    """Per-step wall, device and phase times, and the top ops, from a finished profile."""
    host, device = {}, {}  # phase -> ms per step
    annotations: set[str] = set()
    device_us = host_ops = kernels = 0
    for e in prof.events():
        on_device = e.device_type == DeviceType.CUDA
        if e.name.startswith(PHASE_PREFIX):
            into = device if on_device else host
            key = e.name[len(PHASE_PREFIX):]
            into[key] = into.get(key, 0.0) + e.time_range.elapsed_us() / 1e3 / steps
        if getattr(e, "is_user_annotation", False) or e.name.startswith(PHASE_PREFIX):
            annotations.add(e.name)
        elif on_device:
            device_us += e.time_range.elapsed_us()
            kernels += 1
        else:
            host_ops += 1
    wall_ms = wall_s * 1e3 / steps
    device_ms = device_us / 1e3 / steps
    host_ops /= steps
    kernels /= steps
    lines = [f"steps {first_step}..{first_step + steps - 1}: {wall_ms:.1f} ms per step (wall), "
             f"{host_ops:.0f} host ops per step" + (f", {kernels:.0f} device ops" if kernels else "")]
    lines.append("host phases, ms per step: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(host.items())))
    if device_us:
        lines.append(f"device busy {device_ms:.1f} ms per step ({device_ms / wall_ms:.0%} of the wall time)")
        lines.append("device spans of the phases, ms per step: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in sorted(device.items())))
    lines.append("")
    ops = [e for e in prof.key_averages() if e.key not in annotations]
    if device_us:
        lines += ["top ops by device time:", _table(ops, "self_device_time_total", steps), ""]
    lines += ["top ops by host time (self):", _table(ops, "self_cpu_time_total", steps)]
    return ProfileSummary(steps, wall_ms, device_ms, host, "\n".join(lines) + "\n")


def _table(events, attribute: str, steps: int, top: int = 15) -> str:
    ranked = sorted(events, key=lambda e: getattr(e, attribute), reverse=True)[:top]
    rows = [f"  {getattr(e, attribute) / 1e3 / steps:9.2f} ms/step {e.count / steps:8.1f} calls/step  {e.key[:90]}"
            for e in ranked if getattr(e, attribute) > 0]
    return "\n".join(rows)
