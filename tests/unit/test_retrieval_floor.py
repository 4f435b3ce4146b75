"""The retrieval floor: a constraint known only after evaluation, recorded for Optuna and the dashboard."""
from __future__ import annotations

from collections import deque

import optuna
import pytest

from layerboost_core.errors import UserError
from layerboost_core.space import SearchSpace
from layerboost_search.driver import FEASIBLE_ATTR, SearchRun, open_study
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
    def latency(self, plan):
        return 1.0 + plan.count("softmax")


def test_plans_below_the_floor_are_infeasible(tmp_path):
    objective = ObjectiveSettings(retrieval="floor", retrieval_floor=0.5)
    objectives = declare_objectives(objective)
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "floor", objectives,
                       optuna.samplers.RandomSampler(seed=0), heartbeat_interval=5, grace_period=10)
    space = SearchSpace(4, ("softmax", "none"))
    context = {"model_config": None, "option_settings": {}, "bytes_per_value": 4}
    run = SearchRun(objective, 16, space, objectives, study, FlatCost(), RetrievalByCount(), context,
                    retrieval_floor=0.5)
    run.kv_bytes = lambda plan: 0  # no model config here; KV bytes are not what this test is about
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
    assert [o.name for o in declare_objectives(ObjectiveSettings(retrieval="objective"))][-1] == "retrieval_acc"


def test_latency_ceiling_is_a_named_optuna_constraint(tmp_path):
    """Known before evaluation: recorded at ask time (Optuna 5 takes constraints one name at a time)."""
    objective = ObjectiveSettings(latency_ceiling=3.0)
    objectives = declare_objectives(objective)
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "ceiling", objectives,
                       optuna.samplers.RandomSampler(seed=1), heartbeat_interval=5, grace_period=10)
    context = {"model_config": None, "option_settings": {}, "bytes_per_value": 4}
    run = SearchRun(objective, 16, SearchSpace(4, ("softmax", "none")), objectives, study, FlatCost(),
                    RetrievalByCount(), context)
    run.kv_bytes = lambda plan: 0
    run.run(8, progress=False)
    for trial in (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE):
        fits = trial.user_attrs["plan"].count("S") <= 2  # FlatCost: 1 s + 1 s per softmax layer
        assert trial.user_attrs[FEASIBLE_ATTR] is fits
        assert (trial.system_attrs["constraints:latency_ceiling"] <= 0) is fits


class MixedDtypes(RetrievalByCount):
    """Workers that resolved `dtype=auto` differently: every other result comes back at float32."""

    def next_result(self):
        key, result = super().next_result()
        self.count = getattr(self, "count", 0) + 1
        return key, {**result, "dtype": "float32" if self.count % 2 else "bfloat16"}


def test_evaluations_at_more_than_one_dtype_are_recorded_and_warned_about(tmp_path, caplog):
    objective = ObjectiveSettings()
    objectives = declare_objectives(objective)
    study = open_study(f"sqlite:///{tmp_path / 's.db'}", "dtypes", objectives,
                       optuna.samplers.RandomSampler(seed=0), heartbeat_interval=5, grace_period=10)
    context = {"model_config": None, "option_settings": {}, "bytes_per_value": 4}
    run = SearchRun(objective, 16, SearchSpace(4, ("softmax", "none")), objectives, study, FlatCost(),
                    MixedDtypes(), context)
    run.kv_bytes = lambda plan: 0
    with caplog.at_level("WARNING", logger="layerboost_search.driver"):
        run.run(6, progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted({t.user_attrs["dtype"] for t in done}) == ["bfloat16", "float32"]
    warnings = [r.getMessage() for r in caplog.records if "dtype=auto" in r.getMessage()]
    assert warnings == ["plans of this run were evaluated at bfloat16 and float32: workers resolved dtype=auto "
                        "differently; set dtype= explicitly so every worker scores alike"]
