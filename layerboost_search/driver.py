"""The search: an Optuna study (ask/tell) whose plans are evaluated by a runner pool.

Resumable and shared: the study lives at a stable storage; running the same command again continues it, and
any number of drivers may run it at once. Each records heartbeats for the trials it evaluates; trials of a
driver that stopped beating for the grace period are failed and re-queued. A plan is never evaluated twice
(duplicates are pruned with a pointer to the first evaluation). `budget` counts completed distinct plans.
The storage, the lock, heartbeats and stale trials are `study`'s; this module is the ask/tell loop.
"""
from __future__ import annotations

import logging
import random
import time
import warnings

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from layerboost_core.errors import UserError
from layerboost_core.plan import LayerPlan
from layerboost_core.space import SearchSpace

from .objectives import predicted_constraints, retrieval_shortfall, speed_of
from .settings import ObjectiveSettings
from .space import distributions, suggest
from .study import (FEASIBLE_ATTR, LABEL_ATTR, PLAN_ATTR, REQUEUED_ATTR, Heartbeat, fail_stale, pop_requeued, storage_url_of,
                    waiting_trial_lock)

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 500


class SearchRun:
    """One driver's search over a study, with the plan-level bookkeeping ask/tell needs.

    Other drivers may run the same search on the same study at the same time: before a plan is evaluated its
    trial claims it (the `plan` user attr) and a slot of the budget (the `feasible` user attr), and backs off
    when another running or completed trial holds it. Claims are written before the study is read, so of two
    drivers racing for one plan or the last slot at least one sees the other; both may back off (one retries).
    """

    def __init__(self, objective: ObjectiveSettings, space: SearchSpace, objectives, study: optuna.Study, cost,
                 runner, surrogate=None, retrieval_floor: float | None = None, retrieval_facts: int = 0):
        """`cost`: the serving cost model at the workload (serving_cost.ServingCostModel: every plan's predicted
        TTFT, TPOT, throughput, request latency and cache bytes); `surrogate`: an optional `SurrogateFeed` whose
        proposals are enqueued as the search runs; `retrieval_floor`: the `retrieval_acc` a plan must keep to be
        feasible (known only once it is evaluated), judged over the `retrieval_facts` facts the proxy plants
        (objectives.retrieval_shortfall: only a plan certainly below it is infeasible)."""
        self.objective, self.retrieval_floor, self.retrieval_facts = objective, retrieval_floor, retrieval_facts
        self.space, self.objectives, self.study = space, objectives, study
        self.cost, self.runner, self.surrogate = cost, runner, surrogate
        self.speed = speed_of(objectives)
        self.in_flight: dict[int, tuple] = {}  # trial number -> (trial, plan)
        self.dtypes_seen: set[str] = set()  # the dtypes evaluations of this run came back at
        self.ask_lock = waiting_trial_lock(storage_url_of(study))

    def completed(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def _claims(self, own: int) -> list:
        """Trials other than `own` that hold a plan: completed, or running with their plan set."""
        return [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                if t.number != own and PLAN_ATTR in t.user_attrs]

    def _slots_taken(self, own: int = -1) -> int:
        """Budget slots held study-wide: completed trials and running ones submitted for evaluation."""
        return sum(t.state == TrialState.COMPLETE or FEASIBLE_ATTR in t.user_attrs for t in self._claims(own))

    def constraints(self, plan: LayerPlan) -> dict[str, float]:
        """Named constraints known before evaluation (objectives.predicted_constraints)."""
        return predicted_constraints(self.objective, self.cost, plan)

    @staticmethod
    def _record_constraints(trial, constraints: dict[str, float]) -> None:
        """Optuna's constraints (its samplers and best_trials honour them) and the `feasible` user attr (which
        optuna-dashboard shows: it ignores the new-style constraints)."""
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        trial.set_user_attr(FEASIBLE_ATTR, all(v <= 0 for v in constraints.values()))

    def predicted_attrs(self, plan: LayerPlan) -> dict:
        """What the cost model predicts for `plan` at the workload, as trial user attrs (trials.csv columns)."""
        served = self.cost.predict(plan)
        return {"ttft_s": served.ttft_s, "tpot_s": served.tpot_s, "throughput_tok_s": served.throughput,
                "latency_s": served.latency_s, "concurrency": served.concurrency,
                "kv_bytes": self.cost.kv_bytes(plan)}

    def _ask(self, budget: int) -> str:
        """Ask one trial and submit it: "submitted", "skipped" (duplicate or outside the space) or "backed off"
        (the last budget slot went to another driver; a queued plan goes back in the queue)."""
        with warnings.catch_warnings(), self.ask_lock:  # ask/tell with our own heartbeat thread, not optimize
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            fixed = distributions(self.space)
            trial = pop_requeued(self.study, fixed) or self.study.ask(fixed)  # a stopped driver's plan first
        self.heartbeat.add(trial._trial_id)
        queued = LABEL_ATTR in trial.user_attrs  # enqueued plans carry their label
        plan = suggest(self.space, trial)
        text = str(plan)
        trial.set_user_attr(PLAN_ATTR, text)
        trial.set_user_attr("plan_id", plan.id)
        if not queued:
            trial.set_user_attr(LABEL_ATTR, "sampled")
        reason = self.space.violation(plan)
        if reason is None:
            holders = sorted(t.number for t in self._claims(trial.number) if t.user_attrs[PLAN_ATTR] == text)
            if holders:
                trial.set_user_attr("duplicate_of", holders[0])
                reason = f"duplicate of trial {holders[0]}"
        if reason is not None:
            return self._drop(trial, reason, requeue=False)
        self._record_constraints(trial, self.constraints(plan))
        if self._slots_taken(trial.number) >= budget:
            return self._drop(trial, "budget held by other drivers' evaluations", requeue=queued)
        self.in_flight[trial.number] = (trial, plan)
        self.runner.submit(trial.number, "evaluate", text)
        return "submitted"

    def _drop(self, trial, reason: str, requeue: bool) -> str:
        trial.set_user_attr("skipped", reason)
        self.study.tell(trial, state=TrialState.PRUNED)
        self.heartbeat.discard(trial._trial_id)
        if not requeue:
            return "skipped"
        kept = {k: trial.user_attrs[k] for k in (LABEL_ATTR, REQUEUED_ATTR) if k in trial.user_attrs}
        self.study.enqueue_trial(trial.params, user_attrs=kept)  # a re-queued plan stays first in line
        return "backed off"

    def _enqueue_surrogate_plans(self, done: int, budget: int) -> None:
        """Ask the surrogate for plans once the queue (seeds, earlier proposals) has drained; no more than the
        budget has slots left, so a run that reaches its budget leaves no proposal waiting."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            return
        claims = self._claims(-1)
        slots = budget - self._slots_taken()
        if slots <= 0:
            return
        done_trials = [t for t in claims if t.state == TrialState.COMPLETE]
        completed = [(LayerPlan.from_string(t.user_attrs[PLAN_ATTR]), t.values[0]) for t in done_trials]
        # plans whose proxy facts fall below the floor (the point estimate, as for the candidates confirmed)
        lost = set() if self.retrieval_floor is None else {
            t.user_attrs[PLAN_ATTR] for t in done_trials
            if t.user_attrs.get("proxy:retrieval_acc", 1.0) < self.retrieval_floor}
        for plan in self.surrogate.propose(done, completed, {t.user_attrs[PLAN_ATTR] for t in claims},
                                           lost)[:slots]:
            self.study.enqueue_trial(self.space.params_of(plan), user_attrs={LABEL_ATTR: "surrogate"})

    def _tell_once(self, number: int, result: dict) -> bool:
        """`_tell`, unless another driver finished the trial first: a storage where `waiting_trial_lock` does
        not hold (a sqlite file on a network share) can hand one waiting trial to two drivers, and both
        evaluate it. The second result is a duplicate; it is dropped (the study already holds the plan once)
        and the search goes on."""
        trial_id = self.in_flight[number][0]._trial_id
        try:
            return self._tell(number, result)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
            if not self.study._storage.get_trial(trial_id).state.is_finished():
                raise
            log.warning("trial %d was finished by another driver; this driver's duplicate result is dropped (%s)",
                        number, error)
            return False

    def _note_dtype(self, dtype: str) -> None:
        """Warn once per new dtype when this run's evaluations come back at more than one: each worker resolves
        `dtype=auto` on its own device (a GPU, a CPU with or without bf16 instructions), and a plan's KL at
        bf16 reads 1-2% above fp32 (benchmarks/bench_dtype.py), so mixed trials do not compare
        exactly."""
        if dtype in self.dtypes_seen:
            return
        self.dtypes_seen.add(dtype)
        if len(self.dtypes_seen) > 1:
            log.warning("plans of this run were evaluated at %s: workers resolved dtype=auto differently; set "
                        "dtype= explicitly so every worker scores alike", " and ".join(sorted(self.dtypes_seen)))

    def _tell(self, number: int, result: dict) -> bool:
        trial, plan = self.in_flight.pop(number)
        self.heartbeat.discard(trial._trial_id)
        if "error" in result:
            trial.set_user_attr("fail_reason", result["error"])
            self.study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d (%s) failed: %s", number, plan, result["error"])
            return False
        metrics = result["metrics"]
        for name, value in metrics.items():
            trial.set_user_attr(f"proxy:{name}", value)
        trial.set_user_attr("eval_seconds", result["seconds"])
        if "node" in result:  # the Ray node that evaluated it (a cluster's nodes can differ in speed)
            trial.set_user_attr("node", result["node"])
        if "dtype" in result:
            trial.set_user_attr("dtype", result["dtype"])
            self._note_dtype(result["dtype"])
        predicted = self.predicted_attrs(plan)
        for name, value in predicted.items():
            trial.set_user_attr(name, value)
        values = []
        for objective in self.objectives:
            if objective.name in predicted:  # the speed objective, kv_bytes
                values.append(float(predicted[objective.name]))
            else:
                values.append(metrics[objective.name])
        if self.retrieval_floor is not None:  # a constraint that needs the evaluation: added before tell
            floor = {"retrieval_floor": retrieval_shortfall(metrics["retrieval_acc"], self.retrieval_facts,
                                                            self.retrieval_floor)}
            trial.set_constraint("retrieval_floor", floor["retrieval_floor"])
            trial.set_user_attr(FEASIBLE_ATTR, all(v <= 0 for v in {**self.constraints(plan), **floor}.values()))
        self.study.tell(trial, values)
        return True

    def run(self, budget: int, progress: bool = True) -> None:
        """Evaluate plans until the study (all drivers together) holds `budget` completed distinct plans."""
        self.heartbeat = Heartbeat(self.study)
        interval = self.heartbeat.interval
        bar = tqdm(total=budget, desc="search", unit="eval", disable=not progress)
        skips, last_stale_check = 0, time.monotonic()
        try:
            while (done := self.completed()) < budget:
                bar.update(min(done, budget) - bar.n)
                if interval is not None and time.monotonic() - last_stale_check > interval:  # stopped drivers
                    fail_stale(self.study)
                    last_stale_check = time.monotonic()
                if self.surrogate is not None and self.surrogate.due(done):
                    self._enqueue_surrogate_plans(done, budget)
                while len(self.in_flight) < self.runner.capacity and self._slots_taken() < budget:
                    outcome = self._ask(budget)
                    if outcome == "backed off":
                        break
                    skips = 0 if outcome == "submitted" else skips + 1
                    if skips >= MAX_CONSECUTIVE_SKIPS:
                        raise UserError(f"budget: {budget} distinct plans could not be found in the space after "
                                        f"{skips} consecutive duplicate/invalid proposals (space too small?)")
                if self.in_flight:
                    self._tell_once(*self.runner.next_result())
                    if progress:  # reads every trial back from storage: only when someone sees the bar
                        bar.set_postfix(front=len(self.study.best_trials), failed=len(self.study.get_trials(
                            deepcopy=False, states=(TrialState.FAIL,))))
                else:  # the remaining budget is held by other drivers' evaluations: wait for them
                    time.sleep(random.uniform(0.2, 1.0))
            bar.update(min(done, budget) - bar.n)
        finally:
            self.heartbeat.close()
            bar.close()


def enqueue_seeds(study: optuna.Study, space: SearchSpace, seeds) -> int:
    """Enqueue seed plans once per study (a resumed study keeps its queue)."""
    if study.user_attrs.get("seeds_enqueued"):
        return 0
    count = 0
    queued = set()
    for label, plan in seeds:
        plan = space.project(plan)
        if space.violation(plan) is None and str(plan) not in queued:
            # skip_if_exists: drivers started together both enqueue the seeds; this keeps most copies out
            study.enqueue_trial(space.params_of(plan), user_attrs={LABEL_ATTR: label}, skip_if_exists=True)
            queued.add(str(plan))
            count += 1
    study.set_user_attr("seeds_enqueued", True)
    return count
