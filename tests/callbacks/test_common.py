"""The helpers the callbacks share: learning-rate scaling through every kind of torch scheduler."""
import types

import pytest
import torch
from torch.optim import lr_scheduler as L

from hwaware.callbacks._common import _scale_lr, schedulers_in

SCHEDULES = {
    "lambda": lambda o: L.LambdaLR(o, lambda e: 0.95 ** e),
    "step": lambda o: L.StepLR(o, 3, gamma=0.5),
    "cosine_eta_min": lambda o: L.CosineAnnealingLR(o, 20, eta_min=1e-2),
    "warm_restarts_eta_min": lambda o: L.CosineAnnealingWarmRestarts(o, 5, eta_min=1e-2),
    "cyclic": lambda o: L.CyclicLR(o, 0.01, 0.1, step_size_up=4),
    "one_cycle": lambda o: L.OneCycleLR(o, 0.1, total_steps=40),
    "polynomial": lambda o: L.PolynomialLR(o, total_iters=30),
    "sequential_warmup_cosine": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, total_iters=5), L.CosineAnnealingLR(o, 20, eta_min=1e-3)], milestones=[9]),
    "chained": lambda o: L.ChainedScheduler([L.ExponentialLR(o, 0.9), L.LambdaLR(o, lambda e: 1 / (1 + e))]),
}


def _run(make, scale_at, factor, steps=30):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make(opt)
    lrs = []
    for i in range(steps):
        if i == scale_at:
            _scale_lr(types.SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[types.SimpleNamespace(scheduler=sched)]),
                      factor)
            assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("kind", list(SCHEDULES))
def test_scale_lr_runs_the_rest_of_any_schedule_at_factor_times_its_rates(kind):
    """Cosine annealing towards an unscaled eta_min, CyclicLR's unscaled max_lrs and the schedulers
    inside SequentialLR / ChainedScheduler (their own base_lrs) took the rate back up after lr_scale:
    QAT fine-tuned at up to 100x the rate asked for."""
    plain = _run(SCHEDULES[kind], scale_at=None, factor=1.0)
    scaled = _run(SCHEDULES[kind], scale_at=7, factor=0.01)
    assert scaled[:7] == plain[:7]
    torch.testing.assert_close(torch.tensor(scaled[7:], dtype=torch.float64),
                               0.01 * torch.tensor(plain[7:], dtype=torch.float64), rtol=1e-12, atol=0)


def test_reduce_on_plateau_floors_scale_with_the_rates():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = L.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=0.02)
    _scale_lr(types.SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[types.SimpleNamespace(scheduler=sched)]), 0.01)
    assert sched.min_lrs == [pytest.approx(2e-4, rel=1e-12)]
    for _ in range(5):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4, rel=1e-12)  # floored at the scaled min_lr, not stuck at 0.001


def test_a_scheduler_two_configs_reach_is_scaled_once():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    inner = L.LambdaLR(opt, lambda e: 1.0)
    outer = L.ChainedScheduler([inner])
    configs = [types.SimpleNamespace(scheduler=outer), types.SimpleNamespace(scheduler=inner)]
    _scale_lr(types.SimpleNamespace(optimizers=[opt], lr_scheduler_configs=configs), 0.1)
    assert inner.base_lrs == [pytest.approx(0.01, rel=1e-12)]
    assert [type(s).__name__ for s in schedulers_in(outer)] == ["ChainedScheduler", "LambdaLR"]
