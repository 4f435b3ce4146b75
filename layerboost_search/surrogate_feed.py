"""Surrogate-proposed plans fed to a running study (config group `surrogate`).

Every `every` completed trials, once `start_after` trials are done and the seed queue has drained, the
accuracy predictor (single-swap sensitivities corrected by the finished trials) and the exact front solver
propose `count` unseen plans: most on the predicted front, some where the predictor is unsure. They are
enqueued like seeds, labelled `surrogate`, and evaluated like every other trial.
"""
from __future__ import annotations

import logging

from layerboost_core.plan import LayerPlan

from .settings import ObjectiveSettings, SurrogateSettings

log = logging.getLogger(__name__)

SUPPORTED_METRICS = ("kl", "nll_delta")  # lower is better and 0 for the original model: what the predictor models


class SurrogateFeed:
    def __init__(self, settings: SurrogateSettings, space, cost, sensitivity_rows, objectives,
                 objective_cfg: ObjectiveSettings, forbidden=frozenset()):
        """`cost`: the serving cost model (its cache bytes per layer bound the memory ceiling); `forbidden`:
        (layer, option) choices no proposal makes (seeds.retrieval_critical)."""
        self.every, self.count = settings.every, settings.count
        self.next_at = settings.start_after
        self.space, self.cost, self.rows = space, cost, sensitivity_rows
        self.metric = objectives[0].name
        self.objective_cfg = objective_cfg
        self.memory_ceiling = objective_cfg.memory_ceiling
        self.kv_per_layer = getattr(cost, "kv_layer_bytes", None)
        self.max_loss = settings.max_loss
        self.forbidden = frozenset(forbidden)

    @classmethod
    def maybe(cls, settings: SurrogateSettings, space, cost, sensitivity_rows, objectives,
              objective_cfg: ObjectiveSettings, forbidden=frozenset()):
        """A feed when enabled and the quality objective is one the predictor models, else None."""
        if not settings.enabled:
            return None
        if objectives[0].name not in SUPPORTED_METRICS:
            log.warning("surrogate: quality objective %s is not modelled (only %s); surrogate proposals are off",
                        objectives[0].name, ", ".join(SUPPORTED_METRICS))
            return None
        return cls(settings, space, cost, sensitivity_rows, objectives, objective_cfg, forbidden)

    def feasible(self, plan: LayerPlan) -> bool:
        """True when the cost model predicts `plan` within every ceiling (objectives.predicted_constraints)."""
        from .objectives import predicted_constraints

        return all(v <= 0 for v in predicted_constraints(self.objective_cfg, self.cost, plan).values())

    def due(self, done: int) -> bool:
        return done >= self.next_at

    def propose(self, done: int, completed: list[tuple[LayerPlan, float]], exclude: set[str],
                lost: set[str] = frozenset()) -> list[LayerPlan]:
        """`lost`: completed plans that lost the retrieval floor (propose_plans keeps away from them)."""
        from layerboost_surrogates.propose import propose_plans

        self.next_at = done + self.every
        plans = propose_plans(self.space, self.cost, self.rows, completed, self.count, seed=len(completed),
                              exclude=exclude, metric=self.metric, feasible=self.feasible,
                              kv_bytes=self.kv_per_layer if self.memory_ceiling is not None else None,
                              kv_ceiling=self.memory_ceiling,
                              max_loss=None if self.max_loss is None else float(self.max_loss),
                              forbidden=self.forbidden, lost=lost)
        log.debug("surrogate proposed %s after %d trials", [str(p) for p in plans], done)
        return plans
