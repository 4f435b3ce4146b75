"""Cache bytes of plans (exact), and the additive cost model the front solver works in.

Cache bytes per sequence are computed, not measured: per layer, what its option keeps after `context` tokens
(softmax: every token's K/V, or a sliding-window layer's window; linear: sinks + window K/V and the constant-size
sums; mixed<k>: the k kept heads' K/V plus the other heads' linear state; none: nothing), times the dtype's bytes.

`AdditiveCostModel` prices a plan as base + one cost per layer and option: what the exact front solver (an MILP)
optimises over. The serving cost model (serving_cost.py) is additive only at a fixed concurrency, so it hands the
solver one such view per concurrency it prices.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

import torch

from layerboost_core.attention.mixed import MIXED_OPTIONS
from layerboost_core.plan import LayerPlan


def softmax_cached_tokens(config, context: int) -> list[int]:
    """Per layer, the tokens a `softmax` layer keeps after `context`: all of them, but a sliding-window layer
    (Gemma 3's local layers, Mistral's window) only its last window - 1, as transformers' cache layers do
    (the hybrid cache builds its softmax layers from the same layer types)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    except AttributeError:  # a config without per-layer settings: every layer global
        return [context] * config.num_hidden_layers
    return [min(context, int(kwargs["sliding_window"]) - 1) if kind == "sliding_attention" and kwargs.get("sliding_window")
            else context for kind, kwargs in zip(layer_types, layer_kwargs)]


def kv_bytes_per_sequence(plan: LayerPlan, config, settings: dict, context: int, bytes_per_value: int) -> int:
    """Exact cache bytes of one sequence after `context` tokens under `plan`. A one-layer plan (per-option
    figures for the solver) is priced as a global layer. A mixed<k> layer: its k kept heads' K/V as a softmax
    layer keeps them plus the other KV heads' linear state (which needs no `kept_heads`: only k matters)."""
    kept = softmax_cached_tokens(config, context) if len(plan) > 1 else [context]
    return sum(_layer_values(option, config, settings, context, tokens) for option, tokens in zip(plan.layers, kept)
               ) * bytes_per_value


def sequences_at_once(model, settings: dict, workload, plans: dict) -> dict:
    """{label: sequences each of `plans` ({label: LayerPlan}) serves at once under `workload`'s memory budget}: the
    cache-bytes arithmetic (`Workload.concurrency`) on exact bytes per sequence at the workload's context, the
    original's (all-softmax) cache and `model`'s weights setting the budget. Measured serving uses it; the serving
    cost model computes the same from its per-layer bytes."""
    from layerboost_core.bench import weight_bytes

    def cache(plan):
        return kv_bytes_per_sequence(plan, model.config, settings, workload.context, model.dtype.itemsize)

    n = len(next(iter(plans.values())))
    weights, original = weight_bytes(model), cache(LayerPlan.uniform("softmax", n))
    return {label: workload.concurrency(cache(plan), weights, original) for label, plan in plans.items()}


def kv_bytes_per_layer(option: str, config, settings: dict, context: int, bytes_per_value: int,
                       num_layers: int) -> list[int]:
    """Per layer of the model, the cache bytes one sequence keeps there under `option` after `context` tokens (a
    plan's bytes are the sum over its layers: `kv_bytes_per_sequence`)."""
    kept = softmax_cached_tokens(config, context) if num_layers > 1 else [context]
    return [_layer_values(option, config, settings, context, tokens) * bytes_per_value for tokens in kept]


def _layer_values(option: str, config, settings: dict, context: int, kept_tokens: int) -> int:
    """Values one layer keeps for one sequence under `option`; `kept_tokens`: what a softmax layer of its kind
    keeps after `context` tokens (all, or a sliding window)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    if option == "softmax":
        return 2 * kv_heads * head_dim * kept_tokens
    if option == "linear":
        return kv_heads * linear_state_values_per_head(settings["linear"], head_dim, context)
    if option in MIXED_OPTIONS:
        k = MIXED_OPTIONS[option]
        return 2 * k * head_dim * kept_tokens + (kv_heads - k) * linear_state_values_per_head(settings["linear"],
                                                                                            head_dim, context)
    if option == "none":
        return 0
    raise ValueError(f"kv_bytes_per_sequence: no price for option {option!r}")


def linear_state_values_per_head(linear: dict, head_dim: int, context: int) -> int:
    """Values one KV head's `LinearState` holds after `context` tokens (`linear`: the option's settings): the
    sinks' and window's K/V and phi(k), and the (F x (D + 1)) sums; constant once the window is full."""
    features = 2 * int(linear["feature_dim"])
    window = min(int(linear["window"]), context)
    sinks = min(int(linear.get("sinks", 0)), context)
    return 2 * head_dim * (window + sinks) + features * window + features * (head_dim + 1)


@dataclass
class AdditiveCostModel:
    """Predicted latency (seconds) and KV bytes of any plan at one workload."""

    base_seconds: float  # T(all none)
    per_layer_seconds: dict[str, float]  # option -> seconds per layer above `none`
    uniform_seconds: dict[str, float]  # measured T(all option)
    workload: dict
    device: str
    settings: dict

    def latency(self, plan: LayerPlan) -> float:
        return self.base_seconds + sum(self._seconds(o) for o in plan.layers)

    def fastest(self, options) -> float:
        return self.base_seconds + min(self._seconds(o) for o in options) * self.num_layers

    def _seconds(self, option: str) -> float:
        if option not in self.per_layer_seconds:
            raise ValueError(f"the cost model timed {', '.join(self.per_layer_seconds)}, not {option!r}: build it "
                             f"with options including {option!r}")
        return self.per_layer_seconds[option]

    @property
    def num_layers(self) -> int:
        return int(self.settings["num_layers"])

    def views(self, limit: int = 1) -> list[tuple["AdditiveCostModel", float | None]]:
        """[(an additive cost model, KV budget)] for the front solver: an additive model is its own only view."""
        return [(self, None)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"
