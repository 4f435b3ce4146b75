"""Latency and KV-memory cost model of plans at a workload, measured once on the current device.

Layers of one model have identical shapes, so a plan's forward time is additive in its options:
    T(plan) = T(all none) + sum_layers (t[option] - t[none]),  t[o] = (T(all o) - T(all none)) / n_layers
A request is a prefill of `prefill` tokens followed by `decode` cached single-token steps (the hybrid cache:
softmax layers keep all keys and values, linear layers a window plus a constant state, mixed<k> layers the k
kept KV heads' keys and values plus the other heads' linear state, none nothing), so the uniform plans' times
include the decode steps when `decode > 0`. The uniform plans of the options asked for (softmax, linear and
none by default; a mixed option needs its `kept_heads` setting in the switcher, and its parts need not be
trained to be timed) are timed round-robin (median of `repeats`), cached per device, model, option settings
and workload, with the settings stored beside the numbers. KV bytes are exact from the plan.
"""
from __future__ import annotations

import json
import logging
import platform
import statistics
from dataclasses import asdict, dataclass

import torch
from filelock import FileLock

from layerboost_core.attention.mixed import MIXED_OPTIONS
from layerboost_core.cache_dir import cache_root, content_hash, write_json
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import time_plans
from layerboost_core.workload import Workload

log = logging.getLogger(__name__)


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
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads
    kept = softmax_cached_tokens(config, context) if len(plan) > 1 else [context]
    total = 0
    for index, option in enumerate(plan.layers):
        if option == "softmax":
            total += 2 * kv_heads * head_dim * kept[index]
        elif option == "linear":
            total += kv_heads * linear_state_values_per_head(settings["linear"], head_dim, context)
        elif option in MIXED_OPTIONS:
            k = MIXED_OPTIONS[option]
            total += (2 * k * head_dim * kept[index]
                      + (kv_heads - k) * linear_state_values_per_head(settings["linear"], head_dim, context))
        elif option != "none":
            raise ValueError(f"kv_bytes_per_sequence: no price for option {option!r}")
    return total * bytes_per_value


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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}:{torch.get_num_threads()}threads"


def run_request(model, ids: torch.Tensor, decode: int) -> None:
    """One request: the prefill, then `decode` cached steps (greedy; the token does not change the cost)."""
    if not decode:
        model.model(input_ids=ids, use_cache=False)
        return
    from layerboost_core.cache import HybridCache

    cache = HybridCache(model)
    out = model.model(input_ids=ids, cache=cache, use_cache=True)
    token = ids[:, -1:]
    for _ in range(decode):
        out = model.model(input_ids=token, cache=cache, use_cache=True)
    del out


def measure_uniform(switcher, workload: Workload, options, device) -> dict[str, float]:
    """Median time of one request (prefill + decode steps) under each all-`option` plan, timed round-robin."""
    ids = torch.randint(0, switcher.model.config.vocab_size, (workload.batch, workload.prefill), device=device)
    plans = {o: LayerPlan.uniform(o, switcher.num_layers) for o in options}
    times = time_plans(switcher, plans, lambda model: run_request(model, ids, workload.decode),
                       rounds=workload.repeats, warmup=1)
    return {o: statistics.median(t) for o, t in times.items()}


def cost_model(switcher, model_info: dict, option_settings: dict, workload: Workload,
               options=("softmax", "linear", "none")) -> AdditiveCostModel:
    """The cached cost model for this device, model, settings and workload (measured on first use)."""
    device = switcher.model.get_input_embeddings().weight.device
    settings = {"model": model_info["fingerprint"], "num_layers": switcher.num_layers, "options": option_settings,
                "dtype": str(switcher.model.dtype)}
    dev = device_name(device)
    key = content_hash("cost/v1", dev, settings, asdict(workload), sorted(options))
    path = cache_root() / "costs" / f"{model_info['name'].replace('/', '--')}-{key}.json"
    # Drivers started together wait for the one measuring: two timings at once would skew each other, and two
    # cost models could send them to different studies (the space is narrowed by these numbers).
    with FileLock(f"{path}.lock"):
        if path.exists():
            try:
                data = json.loads(path.read_text())
                return AdditiveCostModel(**data)
            except (OSError, ValueError, TypeError):
                log.warning("cost model cache %s is unreadable; measuring again", path)
        log.info("measuring per-layer latency of %s at %s on %s", ", ".join(options), asdict(workload), dev)
        uniform = measure_uniform(switcher, workload, options, device)
        base = uniform["none"] if "none" in uniform else 0.0
        per_layer = {o: (t - base) / switcher.num_layers for o, t in uniform.items()}
        model = AdditiveCostModel(base, per_layer, uniform, asdict(workload), dev, settings)
        write_json(path, asdict(model))
        return model
