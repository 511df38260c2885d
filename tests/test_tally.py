"""The worker's incremental budget tally (`BudgetTally`) answers exactly as a walk over every trial
does, at every step of a study's life: trials created, finished, pruned, failed, refused past the
budget, re-queued and re-run. Part of the fast tier."""

from __future__ import annotations

import random
from datetime import datetime

import pytest
from optuna.trial import FrozenTrial, TrialState

from hpsearch.recovery import OVER_BUDGET
from hpsearch.study import BudgetTally

pytestmark = pytest.mark.fast


# --- the reference: every question answered by a walk over every trial ------------------------
def _counts(t: FrozenTrial) -> bool:
    return OVER_BUDGET not in t.system_attrs


def _is_retry(t: FrozenTrial) -> bool:
    return "retry_history" in t.system_attrs


def walked_state(trials: list[FrozenTrial]) -> tuple:
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    count = {s: 0 for s in TrialState}
    for t in trials:
        if _counts(t) and not (t.state == TrialState.FAIL and t.number in retried):
            count[t.state] += 1
    values = [t.value for t in trials if t.state == TrialState.COMPLETE]
    return (count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
            count[TrialState.RUNNING], count[TrialState.WAITING], min(values, default=None))


def walked_holds_slot(trials: list[FrozenTrial], number: int, budget: int) -> bool:
    by_number = {t.number: t for t in trials}
    me = by_number.get(number)
    if me is not None and _is_retry(me):
        number = me.system_attrs["retry_history"][0]
        me = by_number.get(number)
    if me is None or not _counts(me):
        return False
    return sum(1 for t in trials if t.number < number and not _is_retry(t) and _counts(t)) < budget


# --- a study's life, at random --------------------------------------------------------------
def frozen(number: int, state: TrialState, value: float | None, system_attrs: dict) -> FrozenTrial:
    now = datetime.now()
    return FrozenTrial(number, state, value, now, now if state.is_finished() else None, {}, {}, {},
                       dict(system_attrs), {}, number)


def life(seed: int, steps: int):
    """Yields the study's trials (a fresh list of FrozenTrials, in number order) after each event."""
    rng = random.Random(seed)
    trials: list[list] = []  # [state, value, system_attrs]
    for _ in range(steps):
        running = [i for i, t in enumerate(trials) if t[0] == TrialState.RUNNING]
        waiting = [i for i, t in enumerate(trials) if t[0] == TrialState.WAITING]
        failed = [i for i, t in enumerate(trials) if t[0] == TrialState.FAIL and OVER_BUDGET not in t[2]]
        event = rng.random()
        if event < 0.3 or not running:
            trials.append([TrialState.RUNNING, None, {}])
        elif event < 0.6:
            trials[rng.choice(running)][:2] = [TrialState.COMPLETE, rng.random()]
        elif event < 0.7:
            trials[rng.choice(running)][0] = TrialState.PRUNED
        elif event < 0.78:
            trials[rng.choice(running)][0] = TrialState.FAIL
        elif event < 0.84:  # refused past the budget: marked, then failed
            t = trials[rng.choice(running)]
            t[2][OVER_BUDGET] = True
            t[0] = TrialState.FAIL
        elif event < 0.92 and failed:  # re-queued: a waiting copy that names its chain
            source = rng.choice(failed)
            chain = trials[source][2].get("retry_history", []) + [source]
            trials.append([TrialState.WAITING, None, {"retry_history": chain}])
        elif waiting:
            trials[rng.choice(waiting)][0] = TrialState.RUNNING
        yield [frozen(i, s, v, a) for i, (s, v, a) in enumerate(trials)]


@pytest.mark.parametrize("seed", range(6))
def test_the_tally_answers_as_a_walk_over_every_trial_at_every_step(seed: int) -> None:
    tally = BudgetTally()  # one per worker, asked again and again as the study grows
    for step, trials in enumerate(life(seed, 400)):
        budget = 1 + step // 3
        b = tally.state(trials, budget)
        assert (b.complete, b.pruned, b.failed, b.running, b.waiting, b.best) == walked_state(trials), step
        for number in range(len(trials) + 1):
            assert tally.holds_slot(trials, number, budget) == walked_holds_slot(trials, number, budget), (step, number)


def test_the_tally_takes_a_list_with_gaps_in_its_numbers_afresh() -> None:
    tally = BudgetTally()
    trials = [frozen(i, TrialState.COMPLETE, float(i), {}) for i in range(5)]
    assert tally.state(trials, 10).complete == 5
    gapped = [trials[0], trials[2], frozen(7, TrialState.RUNNING, None, {})]
    b = tally.state(gapped, 10)
    assert (b.complete, b.running, b.best) == (2, 1, 0.0)
    assert tally.holds_slot(gapped, 7, 3) and not tally.holds_slot(gapped, 7, 2)
    # and a list shorter than what it has tallied (another study's) is no prefix of it
    assert tally.state(trials, 10).complete == 5 and tally.state(trials[:2], 10).complete == 2
