"""Exact predicted front: the plan of least predicted quality loss under a latency (and KV-memory) budget, as a
mixed-integer program solved with scipy's HiGHS (`scipy.optimize.milp`).

Variables: binary x[l, o] (layer l takes option o, one per layer) and, for each pairwise quality term of the
predictor, a continuous y in [0, 1] that equals x_a * x_b at the optimum (y >= x_a + x_b - 1 when the term is
a penalty, y <= x_a and y <= x_b when it is a bonus). The space's allowed options, pinned layers and option
counts are constraints; latency and KV bytes are additive per layer, as in the cost model.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from layerboost_core.pareto import front_indices
from layerboost_core.plan import LayerPlan

from .accuracy import BASELINE, QualityTerms
from .cost_model import AdditiveCostModel, kv_bytes_per_sequence


def kv_per_layer(options, model_config, settings: dict, context: int, bytes_per_value: int) -> dict[str, float]:
    """KV bytes one layer of each option keeps for one sequence (the cost model's KV bytes are per layer)."""
    return {o: float(kv_bytes_per_sequence(LayerPlan((o,)), model_config, settings, context, bytes_per_value))
            for o in options}


@contextmanager
def _native_stdout_silenced():
    """HiGHS (inside scipy 1.17) prints debugging lines from C++ straight to file descriptor 1 on some
    30-layer problems; they would break the search's progress display. Python-level output is unaffected
    outside this block."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class FrontSolver:
    """Minimises `terms` (predicted quality loss) over the plans of `space` within latency / KV budgets, never
    giving a layer an option `forbidden` holds for it ((layer, option) pairs: e.g. the choices that alone lose
    the retrieval floor)."""

    def __init__(self, space, cost: AdditiveCostModel, terms: QualityTerms, kv_bytes: dict[str, float] | None = None,
                 forbidden=frozenset()):
        self.space, self.cost, self.terms, self.kv_bytes = space, cost, terms, kv_bytes
        self.forbidden = frozenset(forbidden)
        self.num_layers = space.num_layers
        self.options = tuple(dict.fromkeys([*space.options, *space.pinned.values()]))  # columns of x
        for option in self.options:
            if option != BASELINE and option not in terms.options:
                raise ValueError(f"solver: option {option!r} is in the space but has no predicted quality")
            if option not in cost.per_layer_seconds:
                raise ValueError(f"solver: option {option!r} is in the space but not in the cost model")
            if kv_bytes is not None and option not in kv_bytes:
                raise ValueError(f"solver: option {option!r} has no KV bytes")
        self._build()

    def _column(self, layer: int, option: str) -> int:
        return layer * len(self.options) + self.options.index(option)

    def _build(self) -> None:
        layers, width = self.num_layers, len(self.options)
        nx = layers * width
        quality = np.zeros(nx)
        term_column = {o: k for k, o in enumerate(self.terms.options)}
        for layer in range(layers):
            for option in self.options:
                if option != BASELINE:
                    quality[self._column(layer, option)] = self.terms.unary[layer, term_column[option]]
        pairs = [(self._column(l1, self.terms.options[k1]), self._column(l2, self.terms.options[k2]), c)
                 for l1, k1, l2, k2, c in self.terms.pairs
                 if c != 0.0 and self.terms.options[k1] in self.options and self.terms.options[k2] in self.options]
        nv = nx + len(pairs)
        self.quality = np.concatenate([quality, [c for _, _, c in pairs]])
        self.latency = np.zeros(nv)
        self.latency[:nx] = np.tile([self.cost.per_layer_seconds[o] for o in self.options], layers)
        upper = np.ones(nv)
        for layer in range(layers):
            for option in self.options:
                allowed = self.space.pinned.get(layer, option) == option and (
                    layer in self.space.pinned or option in self.space.options) and (
                    layer in self.space.pinned or (layer, option) not in self.forbidden)
                if not allowed:
                    upper[self._column(layer, option)] = 0.0
        self.bounds = Bounds(np.zeros(nv), upper)
        self.integrality = np.concatenate([np.ones(nx), np.zeros(len(pairs))])

        rows, low, high = [], [], []
        for layer in range(layers):  # one option per layer
            row = np.zeros(nv)
            row[layer * width:(layer + 1) * width] = 1.0
            rows.append(row), low.append(1.0), high.append(1.0)
        for option in self.options:  # option-count bounds
            lo, hi = self.space.min_count.get(option, 0), self.space.max_count.get(option, layers)
            if lo > 0 or hi < layers:
                row = np.zeros(nv)
                row[[self._column(layer, option) for layer in range(layers)]] = 1.0
                rows.append(row), low.append(float(lo)), high.append(float(hi))
        for i, (a, b, c) in enumerate(pairs):  # y = x_a * x_b where the objective needs it
            y = nx + i
            if c > 0:
                row = np.zeros(nv)
                row[[y, a, b]] = [1.0, -1.0, -1.0]
                rows.append(row), low.append(-1.0), high.append(math.inf)
            else:
                for x in (a, b):
                    row = np.zeros(nv)
                    row[[y, x]] = [1.0, -1.0]
                    rows.append(row), low.append(-math.inf), high.append(0.0)
        self.structure = LinearConstraint(np.array(rows), low, high)
        self.kv = None
        if self.kv_bytes is not None:  # option -> bytes of one layer, or -> a list per layer (local layers differ)
            self.kv = np.zeros(nv)
            self.kv[:nx] = [self.kv_bytes[o][layer] if isinstance(self.kv_bytes[o], (list, tuple)) else self.kv_bytes[o]
                            for layer in range(layers) for o in self.options]

    def _budget_row(self, coefficients: np.ndarray, budget: float) -> LinearConstraint:
        """coefficients . v <= budget, scaled to unit coefficients so HiGHS's absolute tolerances are relative."""
        unit = float(np.max(np.abs(coefficients))) or 1.0
        return LinearConstraint(coefficients[None, :] / unit, -math.inf, budget / unit + 1e-9)

    def _excluding(self, plans) -> LinearConstraint | None:
        """No-good cuts: each plan in `plans` differs from the solution in at least one layer."""
        rows = []
        for plan in plans:
            if len(plan) == self.num_layers and all(o in self.options for o in plan.layers):
                row = np.zeros(self.quality.size)
                row[[self._column(layer, o) for layer, o in enumerate(plan.layers)]] = 1.0
                rows.append(row)
        return LinearConstraint(np.array(rows), -math.inf, self.num_layers - 1) if rows else None

    def _solve(self, objective: np.ndarray, latency_budget: float | None, kv_budget: float | None,
               exclude=()) -> LayerPlan | None:
        constraints = [self.structure]
        cuts = self._excluding(exclude)
        if cuts is not None:
            constraints.append(cuts)
        if latency_budget is not None and math.isfinite(latency_budget):
            constraints.append(self._budget_row(self.latency, latency_budget - self.cost.base_seconds))
        if kv_budget is not None and math.isfinite(kv_budget):
            if self.kv is None:
                raise ValueError("solver: a KV budget needs kv_bytes")
            constraints.append(self._budget_row(self.kv, kv_budget))
        with _native_stdout_silenced():
            result = milp(objective, constraints=constraints, integrality=self.integrality, bounds=self.bounds)
        if result.x is None:  # infeasible (status 2) or no solution found
            return None
        width = len(self.options)
        chosen = np.round(result.x[: self.num_layers * width]).reshape(self.num_layers, width)
        return LayerPlan(tuple(self.options[int(np.argmax(row))] for row in chosen))

    def solve(self, latency_budget: float | None = None, kv_budget: float | None = None,
              exclude=()) -> LayerPlan | None:
        """The plan of least predicted quality loss with predicted latency <= latency_budget (seconds, base
        included) and KV bytes <= kv_budget, other than the plans in `exclude`; None when no plan meets them."""
        return self._solve(self.quality, latency_budget, kv_budget, exclude)

    def fastest(self, kv_budget: float | None = None, exclude=()) -> LayerPlan | None:
        """A plan of least predicted latency in the space (within the KV budget, not in `exclude`)."""
        return self._solve(self.latency, None, kv_budget, exclude)

    def predicted_quality(self, plan: LayerPlan) -> float:
        return self.terms.value(plan)

    def predicted_front(self, n_points: int, kv_budget: float | None = None, latency_ceiling: float | None = None,
                        exclude=()) -> list[tuple[LayerPlan, float, float]]:
        """Predicted Pareto front of the plans not in `exclude`: (plan, predicted quality, predicted latency)
        from `n_points` latency budgets spread evenly between the fastest plan and the best-quality plan (or
        `latency_ceiling`), deduplicated and with dominated points dropped, by latency."""
        exclude = list(exclude)
        fastest = self.fastest(kv_budget, exclude)
        best = self.solve(latency_ceiling, kv_budget, exclude)
        if fastest is None or best is None:
            return []
        low, high = self.cost.latency(fastest), self.cost.latency(best)
        budgets = np.linspace(low, high, max(2, n_points)) if high > low else [low]
        found: dict[str, tuple[LayerPlan, float, float]] = {}
        for plan in [best, *(self.solve(b, kv_budget, exclude) for b in budgets)]:
            if plan is not None:
                found.setdefault(str(plan), (plan, self.predicted_quality(plan), self.cost.latency(plan)))
        points = list(found.values())
        return [points[i] for i in front_indices([(latency, quality) for _, quality, latency in points])]


def front_over_views(space, cost, terms: QualityTerms, n_points: int, kv_ceiling: float | None = None,
                     latency_ceiling: float | None = None, exclude=(), forbidden=frozenset(),
                     views: int = 3) -> list[tuple[LayerPlan, float, float]]:
    """The predicted front of a serving cost model whose cost is not additive (serving_cost.ServingCostModel:
    the concurrency depends on the whole plan's cache): the exact front in each of its additive views (a
    concurrency, with the KV budget that lets it fit), re-priced with the exact cost, dominated points dropped;
    (plan, predicted quality, cost), cheapest first. An additive cost model is its own single view; a serving one
    gives up to `views` (both ends of its concurrencies first)."""
    found: dict[str, tuple[LayerPlan, float, float]] = {}
    kv_layers = getattr(cost, "kv_layer_bytes", None)
    chosen = cost.views(views)
    per_view = max(4, n_points // len(chosen))  # the same number of solves in all, spread over the views
    for view, kv_budget in chosen:
        budgets = [b for b in (kv_budget, kv_ceiling) if b is not None]
        solver = FrontSolver(space, view, terms, kv_layers if budgets and kv_layers else None, forbidden)
        for plan, quality, _ in solver.predicted_front(per_view, min(budgets) if budgets else None, None, exclude):
            found.setdefault(str(plan), (plan, quality, cost.latency(plan)))
    points = [p for p in found.values() if latency_ceiling is None or p[2] <= latency_ceiling]
    return sorted((points[i] for i in front_indices([(c, q) for _, q, c in points])), key=lambda p: p[2])
