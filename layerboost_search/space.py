"""The search space seen by Optuna: one categorical distribution per free layer (the space itself is the
plain value layerboost_core.space.SearchSpace), and the options a search can skip before it starts.

Two kinds of option never belong in a study, and `narrow` drops them with a line saying why:
* options the model cannot run (a `mixed<k>` option keeps k KV heads softmax and needs k + 1 of them: Gemma 3
  270M has one), or that nothing can configure (`mixed` keeps the heads the planted facts show; no facts, no
  choice);
* options the cost model measured to be no cheaper than `softmax` in any piece of the workload's cost (prefill,
  and the decode step at every concurrency) in every round, and no smaller in cache bytes where those matter:
  `softmax` is the original attention itself, so such an option loses to it in every layer of every plan. On a
  CPU whose softmax attention is a fused kernel (AMX bf16) `linear` can cost more than softmax at a 2,048-token
  prefill and pay only from longer contexts or in decoding: measured, not assumed (`space.prune_dominated`). An
  option whose rounds overlap softmax's is kept: timings that two runs would rank differently decide nothing.
The study is then opened over the narrowed options, so its name records them.
"""
from __future__ import annotations

from dataclasses import replace

import optuna

from layerboost_core.attention import OPTIONS
from layerboost_core.errors import UserError
from layerboost_core.inference.mixed_attention import MIXED_OPTIONS
from layerboost_core.plan import LayerPlan
from layerboost_core.space import SearchSpace, layer_param


def distributions(space: SearchSpace) -> dict:
    return {layer_param(i): optuna.distributions.CategoricalDistribution(list(space.options))
            for i in space.free_layers()}


def suggest(space: SearchSpace, trial) -> LayerPlan:
    names = [space.pinned.get(i) or trial.suggest_categorical(layer_param(i), list(space.options))
             for i in range(space.num_layers)]
    return LayerPlan(tuple(names))


def narrow(space: SearchSpace, model_config, facts: int, cost=None, kv_matters: bool = False,
           prune_dominated: bool = True) -> tuple[SearchSpace, list[str]]:
    """(`space` without the options no plan of this search should use, one line per option dropped); see the
    module docstring. `cost` (a ServingCostModel timing every option left) decides the dominated ones: an option
    whose every piece (prefill, decode step at each concurrency) measured above softmax's in every round, and
    whose cache is no smaller when cache bytes matter (`kv_matters`). Pinned options stay."""
    kv_heads = getattr(model_config.get_text_config(decoder=True), "num_key_value_heads", None) or 1
    notes, kept = [], []
    for option in space.options:
        spec = OPTIONS.get(option)
        if spec.min_kv_heads > kv_heads:
            notes.append(f"{option}: needs a model with at least {spec.min_kv_heads} KV heads; this one has {kv_heads}")
        elif option in MIXED_OPTIONS and not facts:
            notes.append(f"{option}: keeps the heads that retrieve the planted facts, and proxy.facts is 0")
        elif (prune_dominated and cost is not None and option != "softmax" and "softmax" in space.options
              and cost.dominated(option, kv_matters)):
            notes.append(f"{option}: measured no cheaper than softmax in every round at this workload (prefill "
                         f"{cost.prefill_s[option] * 1e3:.1f} vs {cost.prefill_s['softmax'] * 1e3:.1f} ms per layer"
                         + (", and every decode step" if cost.grid else "") + ")")
        else:
            kept.append(option)
    if len(kept) == len(space.options):
        return space, []
    why = "; ".join(notes)
    if len(kept) < 2:  # one option is one plan: nothing to search
        raise UserError(f"space.options: {list(space.options)} leaves {kept or 'nothing'} to search on this model and "
                        f"workload ({why}); set space.prune_dominated=false, other options, or another workload")
    for option in space.min_count:
        if option not in kept and space.min_count[option] > 0:
            raise UserError(f"space.min_count: asks for {option}, which is not searched here ({why})")
    narrowed = replace(space, options=tuple(kept))
    narrowed.check_consistent()
    return narrowed, notes
