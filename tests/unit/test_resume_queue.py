"""What a resumed or finished search leaves in the queue: a stopped driver's re-queued plan is evaluated before
anything else waiting, surrogate proposals never outnumber the budget's free slots, and seeds the budget did
not reach are said in the report."""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from layerboost_core.plan import LayerPlan
from layerboost_search.report import waiting_note
from layerboost_search.settings import ObjectiveSettings
from layerboost_search.study import LABEL_ATTR, REQUEUED_ATTR, pop_requeued
from layerboost_search.space import distributions

from .test_retrieval_floor import RetrievalByCount, small_run

optuna.logging.set_verbosity(optuna.logging.WARNING)


def enqueue(study, run, plan: str, **attrs) -> None:
    study.enqueue_trial(run.space.params_of(LayerPlan.from_string(plan)), user_attrs={LABEL_ATTR: "seed", **attrs})


def test_a_requeued_plan_is_popped_before_older_waiting_trials(tmp_path):
    run, study = small_run(tmp_path, "pop", ObjectiveSettings(retrieval="off"), RetrievalByCount(), seed=0)
    for plan in ("SSSS", "SSSN", "SSNN"):
        enqueue(study, run, plan)
    enqueue(study, run, "NNNN", **{REQUEUED_ATTR: 7})
    trial = pop_requeued(study, distributions(run.space))
    assert trial.params == run.space.params_of(LayerPlan.from_string("NNNN"))
    assert study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING
    assert pop_requeued(study, distributions(run.space)) is None  # only one was re-queued
    assert len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))) == 3


def test_a_run_whose_budget_fills_before_the_queue_drains_still_evaluates_the_requeued_plan(tmp_path):
    run, study = small_run(tmp_path, "resume", ObjectiveSettings(retrieval="off"), RetrievalByCount(), seed=0)
    for plan in ("SSSS", "SSSN", "SSNN", "SNNN"):
        enqueue(study, run, plan)
    enqueue(study, run, "NNNN", **{REQUEUED_ATTR: 3})  # behind every seed, as the stale-trial callback puts it
    run.run(2, progress=False)
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.datetime_start)
    assert [t.user_attrs["plan"] for t in done] == ["NNNN", "SSSS"]  # the re-queued plan first
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    note = waiting_note(study)
    assert len(waiting) == 3 and note.startswith("- queued, not evaluated: 3 plan(s)") and "larger `budget`" in note


class ProposeSix:
    """A surrogate feed that always proposes six plans."""

    def due(self, done):
        return True

    def propose(self, done, completed, exclude, lost=frozenset()):
        plans = ["SSSS", "SSSN", "SSNS", "SNSS", "NSSS", "SSNN", "SNSN", "NSSN", "NNSS"]
        return [LayerPlan.from_string(p) for p in plans if p not in exclude][:6]


def test_surrogate_proposals_never_exceed_the_budget_left(tmp_path):
    run, study = small_run(tmp_path, "surrogate", ObjectiveSettings(retrieval="off"), RetrievalByCount(), seed=0)
    run.surrogate = ProposeSix()
    run.run(4, progress=False)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 4
    assert not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert waiting_note(study) == ""


class RecordsLost(ProposeSix):
    """ProposeSix, recording the plans the driver says lost the retrieval floor at each call."""

    def __init__(self):
        self.calls = []

    def propose(self, done, completed, exclude, lost=frozenset()):
        self.calls.append(({str(p) for p, _ in completed}, set(lost)))
        return super().propose(done, completed, exclude, lost)


def test_the_surrogate_is_told_which_plans_lost_the_retrieval_floor(tmp_path):
    """RetrievalByCount keeps a share of the facts equal to the share of softmax layers: at a floor of 0.75 a plan
    with two `none` layers (0.5) lost it, one with a single one (0.75) kept it."""
    run, study = small_run(tmp_path, "lost", ObjectiveSettings(retrieval="floor", retrieval_floor=0.75),
                           RetrievalByCount(), seed=0, retrieval_floor=0.75)
    run.surrogate = feed = RecordsLost()
    run.run(8, progress=False)
    assert any(completed for completed, _ in feed.calls)
    for completed, lost in feed.calls:
        assert lost == {plan for plan in completed if plan.count("S") < 3}
    assert any(lost for _, lost in feed.calls)
