"""The search space seen by Optuna: one categorical distribution per free layer (the space itself is the
plain value layerboost_core.space.SearchSpace)."""
from __future__ import annotations

import optuna

from layerboost_core.plan import LayerPlan
from layerboost_core.space import SearchSpace, layer_param


def distributions(space: SearchSpace) -> dict:
    return {layer_param(i): optuna.distributions.CategoricalDistribution(list(space.options))
            for i in space.free_layers()}


def suggest(space: SearchSpace, trial) -> LayerPlan:
    names = [space.pinned.get(i) or trial.suggest_categorical(layer_param(i), list(space.options))
             for i in range(space.num_layers)]
    return LayerPlan(tuple(names))
