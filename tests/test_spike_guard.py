"""Skipping a spiking step: the guard's decisions, and optimizers that leave everything as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.optim import build_optimizer
from pipeline.spike_guard import SpikeGuard, TrainingDiverged


def _decisions(guard: SpikeGuard, norms: list[float]) -> list[float]:
    return [float(guard.check(torch.tensor(n))) for n in norms]


def test_guard_skips_spikes_and_non_finite_norms_and_keeps_its_reference():
    guard = SpikeGuard(10.0, decay=0.5)
    assert _decisions(guard, [4.0, 6.0, 1e9, math.inf, math.nan, 49.0, 271.0]) == [0, 0, 1, 1, 1, 0, 1]
    # the reference moved with the accepted steps only: 4 -> 5 -> (5 + 49) / 2
    assert float(guard.reference) == pytest.approx(27.0)
    assert float(guard.skipped) == 4
    resumed = SpikeGuard(10.0, decay=0.5)
    resumed.load_state_dict(guard.state_dict(), torch.device("cpu"))
    assert _decisions(resumed, [271.0, 269.0]) == [1, 0]  # the saved bar: 10 x 27
    assert float(resumed.skipped) == 5


def test_guard_starts_at_the_first_finite_norm():
    guard = SpikeGuard(3.0)
    assert _decisions(guard, [math.inf, 1e6, 2e6, 7e6]) == [1, 0, 0, 1]
    assert SpikeGuard(3.0).state_dict() == {}


def test_a_long_run_of_skips_is_an_error_and_an_accepted_step_resets_the_count():
    """A guard that skips every step has frozen the run: after ``patience`` skips in a row the
    loop's report raises instead of going on in silence; the count survives a checkpoint."""
    guard = SpikeGuard(10.0)
    guard.raise_if_stuck(1, step=0)  # nothing seen yet
    _decisions(guard, [5.0, 1e9, 1e9, 5.0, 1e9, math.nan])
    assert float(guard.in_a_row) == 2 and float(guard.skipped) == 4
    guard.raise_if_stuck(3, step=6)
    resumed = SpikeGuard(10.0)
    resumed.load_state_dict(guard.state_dict(), torch.device("cpu"))
    _decisions(resumed, [math.inf])
    with pytest.raises(TrainingDiverged, match=r"training diverged: the last 3 steps \(to step 7\) were all skipped"):
        resumed.raise_if_stuck(3, step=7)
    _decisions(resumed, [6.0])
    assert float(resumed.in_a_row) == 0
    resumed.raise_if_stuck(1, step=8)
    old = {k: v for k, v in guard.state_dict().items() if k != "in_a_row"}  # a checkpoint from before the count
    resumed.load_state_dict(old, torch.device("cpu"))
    assert float(resumed.in_a_row) == 0


def test_patience_must_be_at_least_one():
    from pipeline.train import TrainConfig

    with pytest.raises(ValueError, match="skip_spikes_patience must be >= 1"):
        TrainConfig(skip_spikes=100.0, skip_spikes_patience=0)


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_guard_needs_a_factor_above_one(factor):
    with pytest.raises(ValueError, match="skip_spikes must be > 1"):
        SpikeGuard(factor)


class _Net(nn.Module):
    """Parameter names as the optimizer sorts them: GPT block matrices go to Muon, the rest to AdamW."""

    def __init__(self) -> None:
        super().__init__()
        self.gpt = nn.Module()
        self.gpt.transformer = nn.Module()
        self.gpt.transformer.h = nn.ModuleList([nn.Linear(8, 8, bias=False) for _ in range(2)])
        self.projector = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.gpt.transformer.h:
            x = torch.relu(layer(x))
        return self.projector(x)


def _step(model: nn.Module, optimizer, skip: float | None, scale: float = 1.0) -> None:
    (model(torch.randn(4, 8)).square().mean() * scale).backward()
    optimizer.step(skip=None if skip is None else torch.tensor(skip))
    optimizer.zero_grad(set_to_none=True)


def _state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were(name):
    torch.manual_seed(0)
    model = _Net()
    optimizer = build_optimizer(model, name, lr=1e-2, weight_decay=0.1, fused=True)
    _step(model, optimizer, None)  # states exist (momentum, second moments, step counts)
    before = _state(model, optimizer)
    _step(model, optimizer, 1.0)
    assert _same(_state(model, optimizer), before)
    _step(model, optimizer, 1.0, scale=math.inf)  # a non-finite gradient (NaN after clipping) touches nothing
    assert _same(_state(model, optimizer), before)

    # a step that is not skipped is the optimizer's own step, bit for bit
    twin = copy.deepcopy(model)
    twin_optimizer = build_optimizer(twin, name, lr=1e-2, weight_decay=0.1, fused=True)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loading keeps the tensors
    torch.manual_seed(1)
    _step(model, optimizer, 0.0)
    torch.manual_seed(1)
    _step(twin, twin_optimizer, None)
    assert _same(_state(model, optimizer), _state(twin, twin_optimizer))
    assert not _same(_state(model, optimizer)[0], before[0])


def test_skipping_needs_fused_adamw():
    model = _Net()
    optimizer = build_optimizer(model, "adamw", lr=1e-2, fused=False)
    model(torch.randn(4, 8)).sum().backward()
    with pytest.raises(ValueError, match="fused AdamW"):
        optimizer.step(skip=torch.tensor(1.0))
