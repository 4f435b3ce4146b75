"""Objectives, declared once: name, direction, fidelity. Optuna directions and report columns derive from
this list. The speed objective is one of the serving metrics users serve by (`SPEEDS`); every other serving
metric is recorded beside it, and any of them may be a ceiling (`objective.ceilings`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from layerboost_core.errors import UserError
from layerboost_core.lm_eval_tasks import OFFLINE_TASKS
from layerboost_core.metrics import PROXY_METRICS

from .settings import ObjectiveSettings


@dataclass(frozen=True)
class Objective:
    name: str  # metric name as it appears in the study and the reports
    direction: str  # "minimize" | "maximize"
    fidelity: str  # "proxy" | "lm-eval" | "cost-model"
    unit: str = ""


@dataclass(frozen=True)
class Speed:
    """A serving metric a search can optimise (`objective.speed`): its study column, direction and the best-file
    targets it offers. `targets` are in the metric's own terms: multiples of all-softmax's throughput, or shares
    of all-softmax's time; `share(target)` turns one into a share of all-softmax's cost (lower is better)."""

    key: str  # the setting's value, and the name of the measured metric (layerboost_core.serving.Served.metric)
    column: str  # objective name in the study
    direction: str
    unit: str
    label: str
    targets: tuple[float, ...]

    def share(self, target: float) -> float:
        return 1.0 / target if self.direction == "maximize" else target

    def file_name(self, target: float) -> str:
        """best/<name>.json of a target: `throughput-2x`, `ttft-80pct`, `latency-50pct`, ..."""
        return f"{self.key}-{target:g}x" if self.direction == "maximize" else f"{self.key}-{round(target * 100)}pct"

    def cost(self, value: float) -> float:
        """A study value of this metric as a cost (lower is better): seconds per output token for throughput."""
        if self.direction == "maximize":
            return 1.0 / value if value and value > 0 else math.inf
        return value

    def text(self, share: float) -> str:
        """A share of all-softmax's cost in the metric's own terms: `2.31x` throughput, or `0.82x` of its time."""
        if self.direction == "maximize":
            return f"{1 / share:.2f}x" if share > 0 else "inf"
        return f"{share:.2f}x"


SPEEDS = {
    "throughput": Speed("throughput", "throughput_tok_s", "maximize", "tok/s", "output tokens/s", (1.5, 2.0, 3.0, 4.0)),
    "ttft": Speed("ttft", "ttft_s", "minimize", "s", "time to first token", (0.9, 0.8, 0.7, 0.6, 0.5)),
    "tpot": Speed("tpot", "tpot_s", "minimize", "s", "time per output token", (0.9, 0.8, 0.7, 0.6, 0.5)),
    "latency": Speed("latency", "latency_s", "minimize", "s", "request latency", (0.9, 0.8, 0.7, 0.6, 0.5)),
}
CEILING_METRICS = ("ttft", "tpot", "latency", "throughput", "kv_bytes")  # objective.ceilings keys


def speed_of(objectives) -> Speed:
    """The speed objective of a declared list (the second objective)."""
    return next(s for s in SPEEDS.values() if s.column == objectives[1].name)


def declare_objectives(settings: ObjectiveSettings, speed: str) -> list[Objective]:
    """The objectives of a search: quality, the serving metric `speed` (resolved: SearchSettings.speed), and
    optionally KV memory and retrieval."""
    quality = settings.quality
    if quality in PROXY_METRICS:
        metric = PROXY_METRICS.get(quality)
        objectives = [Objective(quality, metric.direction, "proxy")]
    elif quality in OFFLINE_TASKS or quality.startswith("lm_eval:"):
        task = quality.removeprefix("lm_eval:")
        objectives = [Objective(f"lm_eval:{task}", "maximize", "lm-eval")]
    else:
        raise UserError(f"objective.quality: unknown value {quality!r}; allowed: {', '.join(PROXY_METRICS)}, "
                        f"{', '.join(OFFLINE_TASKS)} or lm_eval:<task>")
    s = SPEEDS[speed]
    objectives.append(Objective(s.column, s.direction, "cost-model", s.unit))
    if settings.memory:
        objectives.append(Objective("kv_bytes", "minimize", "cost-model", "bytes/sequence"))
    if settings.retrieval == "objective":
        objectives.append(Objective("retrieval_acc", "maximize", "proxy"))
    return objectives


def needs_retrieval(settings: ObjectiveSettings) -> bool:
    """True when the search reads `retrieval_acc` (the proxy must then plant facts)."""
    return settings.retrieval != "off"


def predicted_constraints(objective: ObjectiveSettings, cost, plan) -> dict[str, float]:
    """Named constraints of `plan` known before evaluation, from the cost model's prediction (feasible when every
    value is <= 0): the absolute ceilings (seconds of request latency, cache bytes per sequence) and
    `objective.ceilings` (shares of all-softmax's value; throughput's is a floor: a multiple to reach), timed ones
    with `objective.ceiling_slack` (cache bytes are exact: none)."""
    from layerboost_core.plan import LayerPlan

    served, kv = cost.predict(plan), cost.kv_bytes(plan)
    values = {}
    if objective.latency_ceiling is not None:
        values["latency_ceiling"] = served.latency_s - float(objective.latency_ceiling)
    if objective.memory_ceiling is not None:
        values["memory_ceiling"] = float(kv) - float(objective.memory_ceiling)
    reference = LayerPlan.uniform("softmax", len(plan))
    for metric, limit in objective.ceilings.items():
        if limit is None:
            continue
        slack = 0.0 if metric == "kv_bytes" else objective.ceiling_slack
        if metric == "kv_bytes":
            mine, theirs = kv, cost.kv_bytes(reference)
        else:
            mine, theirs = served.metric(metric), cost.predict(reference).metric(metric)
        share = mine / theirs if mine is not None and theirs else math.inf
        values[f"{metric}_ceiling"] = (float(limit) * (1 - slack) - share if metric == "throughput"
                                       else share - float(limit) * (1 + slack))
    return values


def keeps_floors_at_proxy(objective: ObjectiveSettings, cost, retrieval_floor: float | None):
    """A predicate on completed trials: does the plan keep, on its point estimates, what every best file must
    keep? Its proxy retrieval_acc at least `retrieval_floor` (None: no floor), and the cost model's prediction
    within `objective.ceilings`, judged within `objective.ceiling_slack` as measured serving judges them. The
    search's constraints are looser on purpose (a few proxy facts are no evidence); confirmation is spent on plans
    that pass this (fidelity.screened_pool). The ceilings keep their slack here because two cost-model
    measurements of one machine priced the TTFT of the same linear-heavy plans at 0.98x and 1.08x of softmax's
    (at a 512-token prompt `linear` prefill costs about what SDPA does): with no slack, the run that drew 1.08x
    confirmed no linear-heavy plan and offered nothing, while the other offered 2.2x measured at 0.96x TTFT."""
    from layerboost_core.plan import LayerPlan

    from .study import PLAN_ATTR

    def keeps(trial) -> bool:
        if retrieval_floor is not None and trial.user_attrs.get("proxy:retrieval_acc", -1.0) < retrieval_floor:
            return False
        plan = LayerPlan.from_string(trial.user_attrs[PLAN_ATTR])
        return all(value <= 0 for value in predicted_constraints(objective, cost, plan).values())

    return keeps


def retrieval_shortfall(found: float, facts: int, floor: float) -> float:
    """How far below `floor` a plan's retrieval is with 90% confidence: `floor` minus the upper 90% Clopper-Pearson
    bound of `found` (a rate over `facts` facts); <= 0 when the facts do not show it below. The proxy plants few
    facts (a 512-token block holds 4): one miss is no evidence against a plan, so the search drops only plans
    whose facts show them below the floor (2 of 4 found: a plan right at a 0.9 floor shows that 5% of the time);
    the confirmation rung then judges the candidates on many facts at the pessimistic end (picks.py)."""
    from .fidelity import binomial_interval

    if facts < 1:
        return floor - found
    return floor - binomial_interval(round(found * facts), facts, level=0.8)[1]  # one-sided 90%
