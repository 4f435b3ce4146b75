"""A search runs on any Optuna storage: in memory (a library user's `optuna.create_study()`, the benchmarks)
there are no heartbeats to record and nothing can go stale; on a database they are recorded."""
from __future__ import annotations

import optuna

from layerboost_search.study import Heartbeat
from layerboost_search.objectives import declare_objectives
from layerboost_search.settings import ObjectiveSettings
from tests.unit.test_retrieval_floor import RetrievalByCount, search_over, small_run


def test_a_search_on_an_in_memory_study_runs_to_its_budget():
    objective = ObjectiveSettings()
    study = optuna.create_study(directions=[o.direction for o in declare_objectives(objective, "latency")],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    run = search_over(study, objective, RetrievalByCount())
    run.run(6, progress=False)
    done = [t.user_attrs["plan"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 == len(set(done))
    assert not run.heartbeat.thread.is_alive() and run.heartbeat.interval is None


def test_a_database_study_records_heartbeats(tmp_path):
    _, study = small_run(tmp_path, "beats", ObjectiveSettings(), RetrievalByCount(), seed=0)
    heartbeat = Heartbeat(study)
    try:
        assert heartbeat.interval == 5 and heartbeat.thread.is_alive()
    finally:
        heartbeat.close()
    assert not heartbeat.thread.is_alive()
