"""Objectives, declared once: name, direction, fidelity. Optuna directions and report columns derive from
this list."""
from __future__ import annotations

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


def declare_objectives(settings: ObjectiveSettings) -> list[Objective]:
    """The objectives of a search: quality, latency, and optionally KV memory."""
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
    objectives.append(Objective("latency_s", "minimize", "cost-model", "s"))
    if settings.memory:
        objectives.append(Objective("kv_bytes", "minimize", "cost-model", "bytes/sequence"))
    if settings.retrieval == "objective":
        objectives.append(Objective("retrieval_acc", "maximize", "proxy"))
    return objectives


def needs_retrieval(settings: ObjectiveSettings) -> bool:
    """True when the search reads `retrieval_acc` (the proxy must then plant facts)."""
    return settings.retrieval != "off"
