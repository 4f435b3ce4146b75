"""The shared timing helper: labels take turns round-robin, warm-up rounds are not counted, hooks run untimed
around each call, plans are applied before their call, and the summary's ratios are taken within rounds.
Fake callables and a fake clock: no wall-clock assertions."""
from __future__ import annotations

import itertools

import pytest

from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import round_ratios, spread, summarize, time_plans, time_rounds


class FakeClock:
    """Each reading advances by what the last call "cost": the calls set `self.cost` before returning."""

    def __init__(self):
        self.now, self.cost = 0.0, 0.0

    def __call__(self):
        self.now += self.cost
        self.cost = 0.0
        return self.now


def test_labels_take_turns_and_warmup_rounds_are_not_counted():
    clock, log = FakeClock(), []
    costs = {"a": iter(itertools.count(1)), "b": iter(itertools.count(10))}

    def call(label):
        def run():
            log.append(label)
            clock.cost = float(next(costs[label]))
        return run

    times = time_rounds({"a": call("a"), "b": call("b")}, rounds=3, warmup=2, clock=clock)
    assert log == ["a", "b"] * 5  # 2 warm-up rounds + 3 counted, one call per label per round, in turn
    assert times == {"a": [3.0, 4.0, 5.0], "b": [12.0, 13.0, 14.0]}  # the first two of each were warm-up


def test_alternate_reverses_every_other_round():
    log = []
    time_rounds({k: (lambda k=k: log.append(k)) for k in "abc"}, rounds=2, warmup=1, alternate=True)
    assert log == list("abc") + list("cba") + list("abc")


def test_hooks_run_around_each_call_and_after_only_on_counted_rounds():
    clock, events = FakeClock(), []

    def before(label):
        events.append(("before", label))
        clock.cost = 100.0  # untimed work must not land in the measurement

    def run():
        events.append(("call", "x"))
        clock.cost = 2.0
        return "state"

    times = time_rounds({"x": run}, rounds=2, warmup=1, before=before,
                        after=lambda label, value: events.append(("after", label, value)), clock=clock)
    assert times == {"x": [2.0, 2.0]}
    assert events == [("before", "x"), ("call", "x"),
                      ("before", "x"), ("call", "x"), ("after", "x", "state"),
                      ("before", "x"), ("call", "x"), ("after", "x", "state")]


@pytest.mark.parametrize("rounds, warmup", [(0, 1), (1, -1)])
def test_bad_round_counts_are_refused(rounds, warmup):
    with pytest.raises(ValueError):
        time_rounds({"x": lambda: None}, rounds=rounds, warmup=warmup)


def test_time_plans_applies_each_plan_before_its_request_and_restores(tiny_model):
    model = tiny_model("llama")
    switcher = PlanSwitcher(model, {"linear": {"window": 4, "feature_dim": 8}})
    plans = {"soft": LayerPlan.uniform("softmax", 4), "lin": LayerPlan.from_string("SLLS"),
             "none": LayerPlan.uniform("none", 4)}
    seen, returned = [], []

    def request(m):
        assert m is model
        seen.append(str(switcher.plan))
        return len(seen)

    times = time_plans(switcher, plans, request, rounds=2, warmup=1,
                       after=lambda label, value: returned.append((label, value)))
    assert seen == ["SSSS", "SLLS", "NNNN"] * 3
    assert returned == [("soft", 4), ("lin", 5), ("none", 6), ("soft", 7), ("lin", 8), ("none", 9)]
    assert {k: len(v) for k, v in times.items()} == {"soft": 2, "lin": 2, "none": 2}
    assert str(switcher.plan) == "SSSS"


def test_summary_is_the_spread_and_the_per_round_ratio():
    times = {"base": [2.0, 4.0, 3.0], "fast": [1.0, 1.0, 3.0]}
    assert round_ratios(times, "base")["fast"] == [0.5, 0.25, 1.0]
    summary = summarize(times, baseline="base")
    assert summary["base"] == {"median": 3.0, "min": 2.0, "max": 4.0, "n": 3,
                               "ratio": {"median": 1.0, "min": 1.0, "max": 1.0, "n": 3}}
    assert summary["fast"]["ratio"] == {"median": 0.5, "min": 0.25, "max": 1.0, "n": 3}
    assert "ratio" not in summarize(times)["fast"]
    with pytest.raises(KeyError):
        round_ratios(times, "missing")


def test_spread_leaves_out_what_is_not_a_finite_number():
    assert spread([1.0, float("nan"), None, 3.0, float("inf")]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}
    assert spread([]) == {"median": None, "min": None, "max": None, "n": 0}
