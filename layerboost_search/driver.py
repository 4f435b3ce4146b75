"""The search: an Optuna study (ask/tell) whose plans are evaluated by a runner pool.

Resumable: the study lives at a stable storage; running the same command again continues it, re-queues
trials a killed driver left running, and never evaluates a plan twice (duplicates are pruned with a pointer
to the first evaluation). `budget` counts completed distinct plans.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from layerboost_core.cache_dir import content_hash
from layerboost_core.errors import UserError
from layerboost_core.metrics import METRICS_VERSION
from layerboost_core.plan import LayerPlan

from layerboost_core.space import SearchSpace

from .settings import ObjectiveSettings, SearchSettings
from .space import distributions, suggest

log = logging.getLogger(__name__)

PLAN_ATTR, LABEL_ATTR, FEASIBLE_ATTR = "plan", "label", "feasible"
# lm-eval scores arrive after a trial has finished, and Optuna refuses to change a finished trial, so they
# live in the study's user attrs under this prefix + the trial number ({task: accuracy}); the dashboard
# shows them there and the report merges them into the trial's own `lm_eval:<task>` columns.
LM_EVAL_STUDY_ATTR = "lm_eval:trial:"


def record_lm_eval(study: optuna.Study, number: int, scores: dict) -> None:
    study.set_user_attr(f"{LM_EVAL_STUDY_ATTR}{number}", {task: float(v) for task, v in scores.items()})


def lm_eval_scores(study: optuna.Study) -> dict[int, dict]:
    """{trial number: {task: accuracy}} for every trial scored with lm-eval."""
    return {int(key.removeprefix(LM_EVAL_STUDY_ATTR)): value for key, value in study.user_attrs.items()
            if key.startswith(LM_EVAL_STUDY_ATTR)}
MAX_CONSECUTIVE_SKIPS = 500


def _safe(name: str) -> str:
    """A study / file name: letters, digits, '.', '_' and '-' only."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def study_name(settings: SearchSettings, info: dict, bank_id: str) -> str:
    """`settings.study`, or a name derived from everything that makes two studies' numbers comparable."""
    if settings.study:
        return _safe(str(settings.study))
    key = content_hash(METRICS_VERSION, info["fingerprint"], bank_id, settings.space, asdict(settings.objective),
                       asdict(settings.workload), asdict(settings.workbench.data), settings.sampler_name)
    return _safe(f"{info['name']}-{key[:10]}")


def storage_url(settings: SearchSettings, name: str) -> str:
    if settings.storage:
        return str(settings.storage)
    path = Path(settings.output_dir) / "studies" / f"{name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def open_study(url: str, name: str, objectives, sampler) -> optuna.Study:
    try:
        study = optuna.create_study(study_name=name, storage=url, sampler=sampler, load_if_exists=True,
                                    directions=[o.direction for o in objectives])
    except ValueError as error:
        raise UserError(f"storage: study {name!r} exists with other objectives ({error})") from None
    except Exception as error:  # sqlalchemy / RDB errors for unusable URLs or paths
        raise UserError(f"storage: cannot open {url!r} ({type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0]})") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in objectives])
    return study


def requeue_abandoned(study: optuna.Study) -> int:
    """Trials left RUNNING by a killed driver: mark failed and enqueue their plan again."""
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={LABEL_ATTR: trial.user_attrs.get(LABEL_ATTR, "sampled"),
                                                       "requeued_from": trial.number})
        count += 1
    return count


class SearchRun:
    """One search over a study, with the plan-level bookkeeping ask/tell needs."""

    def __init__(self, objective: ObjectiveSettings, context_tokens: int, space: SearchSpace, objectives,
                 study: optuna.Study, cost, runner, config_for_plan, surrogate=None):
        """`context_tokens`: the workload's tokens per sequence (what KV bytes are counted at); `surrogate`: an
        optional `SurrogateFeed` whose proposals are enqueued as the search runs."""
        self.objective, self.context_tokens = objective, context_tokens
        self.space, self.objectives, self.study = space, objectives, study
        self.cost, self.runner, self.config_for_plan, self.surrogate = cost, runner, config_for_plan, surrogate
        self.in_flight: dict[int, tuple] = {}  # trial number -> (trial, plan)
        self.seen: dict[str, int] = {}  # plan string -> trial number that evaluated (or is evaluating) it
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            self.seen.setdefault(trial.user_attrs.get(PLAN_ATTR, ""), trial.number)

    def completed(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def constraints(self, plan: LayerPlan) -> list[float]:
        o = self.objective
        values = []
        if o.latency_ceiling is not None:
            values.append(self.cost.latency(plan) - float(o.latency_ceiling))
        if o.memory_ceiling is not None:
            values.append(float(self.kv_bytes(plan)) - float(o.memory_ceiling))
        return values

    def kv_bytes(self, plan: LayerPlan) -> int:
        from layerboost_surrogates.cost_model import kv_bytes_per_sequence

        model = self.config_for_plan["model_config"]
        return kv_bytes_per_sequence(plan, model, self.config_for_plan["option_settings"],
                                     self.context_tokens, self.config_for_plan["bytes_per_value"])

    def _ask(self) -> bool:
        """Ask one trial and submit it; False when it was skipped (duplicate or outside the space)."""
        trial = self.study.ask(distributions(self.space))
        plan = suggest(self.space, trial)
        text = str(plan)
        trial.set_user_attr(PLAN_ATTR, text)
        trial.set_user_attr("plan_id", plan.id)
        if LABEL_ATTR not in trial.user_attrs:
            trial.set_user_attr(LABEL_ATTR, "sampled")
        reason = self.space.violation(plan)
        if reason is None and text in self.seen:
            trial.set_user_attr("duplicate_of", self.seen[text])
            reason = f"duplicate of trial {self.seen[text]}"
        if reason is not None:
            trial.set_user_attr("skipped", reason)
            self.study.tell(trial, state=TrialState.PRUNED)
            return False
        constraints = self.constraints(plan)
        if constraints:
            trial.set_constraint(constraints)
        trial.set_user_attr(FEASIBLE_ATTR, all(c <= 0 for c in constraints))
        self.seen[text] = trial.number
        self.in_flight[trial.number] = (trial, plan)
        self.runner.submit(trial.number, "evaluate", text)
        return True

    def _enqueue_surrogate_plans(self, done: int) -> None:
        """Ask the surrogate for plans once the queue (seeds, earlier proposals) has drained."""
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting:
            return
        completed = [(LayerPlan.from_string(t.user_attrs[PLAN_ATTR]), t.values[0])
                     for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.user_attrs.get(PLAN_ATTR)]
        for plan in self.surrogate.propose(done, completed, set(self.seen)):
            self.study.enqueue_trial(self.space.params_of(plan), user_attrs={LABEL_ATTR: "surrogate"})

    def _tell(self, number: int, result: dict) -> bool:
        trial, plan = self.in_flight.pop(number)
        if "error" in result:
            trial.set_user_attr("fail_reason", result["error"])
            self.study.tell(trial, state=TrialState.FAIL)
            self.seen.pop(str(plan), None)
            log.warning("trial %d (%s) failed: %s", number, plan, result["error"])
            return False
        metrics = result["metrics"]
        for name, value in metrics.items():
            trial.set_user_attr(f"proxy:{name}", value)
        trial.set_user_attr("eval_seconds", result["seconds"])
        values = []
        for objective in self.objectives:
            if objective.name == "latency_s":
                values.append(self.cost.latency(plan))
            elif objective.name == "kv_bytes":
                values.append(float(self.kv_bytes(plan)))
            else:
                values.append(metrics[objective.name])
        trial.set_user_attr("latency_s", self.cost.latency(plan))
        trial.set_user_attr("kv_bytes", self.kv_bytes(plan))
        self.study.tell(trial, values)
        return True

    def run(self, budget: int, progress: bool = True) -> None:
        done = self.completed()
        bar = tqdm(total=budget, initial=min(done, budget), desc="search", unit="eval", disable=not progress)
        skips = 0
        try:
            while done < budget:
                if self.surrogate is not None and self.surrogate.due(done):
                    self._enqueue_surrogate_plans(done)
                while len(self.in_flight) < self.runner.capacity and done + len(self.in_flight) < budget:
                    if self._ask():
                        skips = 0
                    else:
                        skips += 1
                        if skips >= MAX_CONSECUTIVE_SKIPS:
                            raise UserError(f"budget: {budget} distinct plans could not be found in the space after "
                                            f"{skips} consecutive duplicate/invalid proposals (space too small?)")
                if not self.in_flight:
                    continue
                number, result = self.runner.next_result()
                if self._tell(number, result):
                    done += 1
                    bar.update(1)
                    if progress:  # reads every trial back from storage: only when someone sees the bar
                        bar.set_postfix(front=len(self.study.best_trials), failed=len(self.study.get_trials(
                            deepcopy=False, states=(TrialState.FAIL,))))
        finally:
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
            study.enqueue_trial(space.params_of(plan), user_attrs={LABEL_ATTR: label})
            queued.add(str(plan))
            count += 1
    study.set_user_attr("seeds_enqueued", True)
    return count
