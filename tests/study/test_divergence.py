"""The divergence guard stops blow-ups and never a healthy loss near zero."""

from __future__ import annotations

import math

import pytest

from kdgqa.study.divergence import WARMUP_STEPS, DivergenceGuard, TrainingDiverged


def _feed(guard: DivergenceGuard, losses: list[float]) -> None:
    for i, loss in enumerate(losses):
        guard.check(loss, 1.0, where=f"step {i}")


def test_a_healthy_loss_near_zero_that_jumps_30x_is_not_a_divergence():
    # The reported false stop: running mean 0.00187, then a normal step of 0.06486.
    guard = DivergenceGuard(20.0)
    losses = [2.3 * 0.8**i for i in range(60)] + [0.00187] * 200 + [0.06486, 0.002]
    _feed(guard, losses)
    assert guard.running is not None and guard.running < 0.01


def test_uptraining_a_model_that_fits_its_data_is_not_stopped_by_a_normal_step():
    # The other reported false stop: the run starts at 0.0033, then a step of 0.095.
    guard = DivergenceGuard(20.0, chance=math.log(10))
    _feed(guard, [0.0033] * 78 + [0.09473, 0.004])
    with pytest.raises(TrainingDiverged, match=r"chance level 2\.303"):
        guard.check(47.0, 1.0, where="at step 80")  # 20 x ln(10) = 46.05


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_or_gradient_stops_at_once(bad):
    with pytest.raises(TrainingDiverged, match="not finite"):
        DivergenceGuard(20.0).check(bad, 1.0, where="step 0")
    with pytest.raises(TrainingDiverged, match="not finite"):
        DivergenceGuard(20.0).check(1.0, bad, where="step 0")


def test_a_loss_far_above_the_start_stops():
    guard = DivergenceGuard(20.0, chance=math.log(10))
    _feed(guard, [2.0] * WARMUP_STEPS + [1.0] * 10)
    guard.check(39.0, 1.0, where="fine")  # under 20 x the starting loss 2.0
    with pytest.raises(TrainingDiverged, match="loss 1000 at step 9 exceeds 20 x"):
        guard.check(1000.0, 1.0, where="at step 9")


def test_nothing_but_non_finite_values_is_judged_while_warming_up():
    guard = DivergenceGuard(20.0)
    _feed(guard, [1.0, 500.0] + [1.0] * (WARMUP_STEPS - 2))
    assert guard.limit() == pytest.approx(20 * max(guard.running, guard.start))


def test_state_round_trips_and_reads_an_old_running_mean():
    guard = DivergenceGuard(20.0)
    _feed(guard, [3.0 - 0.01 * i for i in range(40)])
    again = DivergenceGuard(20.0)
    again.load_state(guard.state())
    assert again == guard
    old = DivergenceGuard(20.0)
    old.load_state(0.5)  # a checkpoint written before the guard kept its start
    assert old.limit() == 10.0
