"""The retrieval floor: a constraint known only after evaluation, recorded for Optuna and the dashboard."""
from __future__ import annotations

from collections import deque

import optuna
import pytest

from layerboost_core.errors import UserError
from layerboost_core.serving import Served
from layerboost_core.space import SearchSpace
from layerboost_search.driver import SearchRun
from layerboost_search.study import FEASIBLE_ATTR, open_study
from layerboost_search.objectives import declare_objectives
from layerboost_search.settings import ObjectiveSettings

optuna.logging.set_verbosity(optuna.logging.WARNING)


class RetrievalByCount:
    """A runner whose plans keep retrieval in proportion to their softmax layers (all-softmax: 1.0)."""

    capacity = 1

    def __init__(self):
        self.queue = deque()

    def submit(self, key, method, plan_text):
        self.queue.append((key, plan_text))

    def next_result(self):
        key, plan_text = self.queue.popleft()
        share = plan_text.count("S") / len(plan_text)
        return key, {"metrics": {"kl": 1 - share, "retrieval_acc": share}, "seconds": 0.0}


class FlatCost:
    """A prefill-only serving cost: 1 s plus 1 s per softmax layer; no cache is counted."""

    def predict(self, plan):
        return Served(1.0 + plan.count("softmax"), None, 1, 0)

    def latency(self, plan):
        return self.predict(plan).latency_s

    def kv_bytes(self, plan):
        return 0


def search_over(study: optuna.Study, objective: ObjectiveSettings, runner,
                retrieval_floor: float | None = None) -> SearchRun:
    """A search of `study` over 4 layers of softmax/none with FlatCost latency and `runner`'s metrics."""
    return SearchRun(objective, SearchSpace(4, ("softmax", "none")), declare_objectives(objective, "latency"), study,
                     FlatCost(), runner, retrieval_floor=retrieval_floor)


def small_run(tmp_path, name: str, objective: ObjectiveSettings, runner, seed: int,
              retrieval_floor: float | None = None) -> tuple[SearchRun, optuna.Study]:
    """`search_over` a new sqlite study."""
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", name, declare_objectives(objective, "latency"),
                       optuna.samplers.RandomSampler(seed=seed), heartbeat_interval=5, grace_period=10)
    return search_over(study, objective, runner, retrieval_floor), study


def test_plans_below_the_floor_are_infeasible(tmp_path):
    run, study = small_run(tmp_path, "floor", ObjectiveSettings(retrieval="floor", retrieval_floor=0.5),
                           RetrievalByCount(), seed=0, retrieval_floor=0.5)
    run.run(8, progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 8
    for trial in done:
        keeps = trial.user_attrs["plan"].count("S") / 4 >= 0.5
        assert trial.user_attrs[FEASIBLE_ATTR] is keeps
        assert (trial.system_attrs["constraints:retrieval_floor"] <= 0) is keeps
    assert all(t.user_attrs[FEASIBLE_ATTR] for t in study.best_trials)


def test_retrieval_settings_are_checked():
    with pytest.raises(UserError, match="^objective.retrieval: unknown value 'sometimes'"):
        ObjectiveSettings(retrieval="sometimes")
    with pytest.raises(UserError, match="^objective.retrieval_floor: 1.5"):
        ObjectiveSettings(retrieval_floor=1.5)
    assert [o.name for o in declare_objectives(ObjectiveSettings(retrieval="objective"), "latency")][-1] == "retrieval_acc"


def test_latency_ceiling_is_a_named_optuna_constraint(tmp_path):
    """Known before evaluation: recorded at ask time (Optuna 5 takes constraints one name at a time)."""
    run, study = small_run(tmp_path, "ceiling", ObjectiveSettings(latency_ceiling=3.0), RetrievalByCount(), seed=1)
    run.run(8, progress=False)
    for trial in (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE):
        fits = trial.user_attrs["plan"].count("S") <= 2  # FlatCost: 1 s + 1 s per softmax layer
        assert trial.user_attrs[FEASIBLE_ATTR] is fits
        assert (trial.system_attrs["constraints:latency_ceiling"] <= 0) is fits


class MixedDtypes(RetrievalByCount):
    """Workers that resolved `dtype=auto` differently: every other result comes back at float32."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def next_result(self):
        key, result = super().next_result()
        self.count += 1
        return key, {**result, "dtype": "float32" if self.count % 2 else "bfloat16"}


def test_evaluations_at_more_than_one_dtype_are_recorded_and_warned_about(tmp_path, caplog):
    run, study = small_run(tmp_path, "dtypes", ObjectiveSettings(), MixedDtypes(), seed=0)
    with caplog.at_level("WARNING", logger="layerboost_search.driver"):
        run.run(6, progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted({t.user_attrs["dtype"] for t in done}) == ["bfloat16", "float32"]
    warnings = [r.getMessage() for r in caplog.records if "dtype=auto" in r.getMessage()]
    assert warnings == ["plans of this run were evaluated at bfloat16 and float32: workers resolved dtype=auto "
                        "differently; set dtype= explicitly so every worker scores alike"]


def test_the_proxy_drops_a_plan_only_when_its_few_facts_show_it_below_the_floor():
    from layerboost_search.objectives import retrieval_shortfall
    from layerboost_search.seeds import retrieval_critical

    # 4 facts (a 512-token block): one miss is no evidence, two are
    assert retrieval_shortfall(3 / 4, 4, 0.9) <= 0 < retrieval_shortfall(2 / 4, 4, 0.9)
    assert retrieval_shortfall(28 / 32, 32, 0.9) <= 0 < retrieval_shortfall(22 / 32, 32, 0.9)
    assert retrieval_shortfall(0.85, 0, 0.9) == pytest.approx(0.05)  # no count known: the rate itself
    rows = [{"layer": 0, "option": "linear", "retrieval_acc": 0.75}, {"layer": 1, "option": "none", "retrieval_acc": 0.25}]
    assert retrieval_critical(rows, 0.9, facts=4) == {(1, "none")}
    assert retrieval_critical(rows, 0.9) == {(0, "linear"), (1, "none")}  # without a count: every shortfall


def test_a_plan_missing_one_of_the_proxys_few_facts_stays_feasible(tmp_path):
    run, study = small_run(tmp_path, "screen", ObjectiveSettings(retrieval="floor", retrieval_floor=0.9),
                           RetrievalByCount(), seed=0, retrieval_floor=0.9)
    run.retrieval_facts = 4
    run.run(8, progress=False)
    for trial in (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE):
        kept = trial.user_attrs["plan"].count("S")  # of 4 facts, RetrievalByCount finds one per softmax layer
        assert trial.user_attrs[FEASIBLE_ATTR] is (kept >= 3)
