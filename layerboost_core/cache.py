"""Hybrid generation cache: each layer keeps exactly what its option needs, and nothing more.

    softmax  the full K/V of every token seen (a transformers `DynamicLayer`, as the unpatched model keeps)
    linear   the `LinearState`: sinks' and last W tokens' K/V plus the constant-size linear sums
    none     nothing

`HybridCache(model)` reads the options from the modules a `PlanSwitcher` put in place, so it works for any
plan, with manual cached forward passes (`model(ids, cache=cache)`) and with `model.generate(cache=...)`.
The `linear` module keeps its own state in `cache.linear_states` (layer index -> LinearState); this file
only gives that dict a home inside a transformers `Cache`, so that masks, positions and `generate` see the
right sequence length whatever the plan.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DummyLayer,
                                      get_layer_types_and_kwargs)

from .attention.linear import LinearSlidingWindowAttention
from .attention.linear_kernels import LinearState
from .attention.none import NoAttention
from .errors import UserError
from .families import family_of
from .plan import LayerPlan


def applied_plan(model) -> LayerPlan:
    """The plan a model's decoder layers currently run, read from their attention modules."""
    def option(attn) -> str:
        if isinstance(attn, LinearSlidingWindowAttention):
            return "linear"
        if isinstance(attn, NoAttention):
            return "none"
        return "softmax"

    return LayerPlan(tuple(option(layer.self_attn) for layer in family_of(model).decoder_layers(model)))


def _state_map(state: LinearState, fn) -> LinearState:
    """`fn` applied to every tensor of the state (batch reordering for beam search and friends). `fn` must
    return new tensors: decoding updates a state's buffers in place."""
    return state.map(fn)


class LinearStateLayer:
    """Cache slot of one `linear` layer: a view on `states[layer_idx]`, which the layer's module writes.

    Not a `CacheLayerMixin`: it holds no growing K/V, so mask sizing and offloading must skip it (the
    cache reports it through `is_linear`)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False  # a recurrent sum cannot be rolled back
    supports_early_init = False
    is_initialized = True
    keys = values = None

    def __init__(self, states: dict[int, LinearState], layer_idx: int):
        self.states, self.layer_idx = states, layer_idx

    @property
    def state(self) -> LinearState | None:
        return self.states.get(self.layer_idx)

    def update(self, *args, **kwargs):
        raise RuntimeError(f"layer {self.layer_idx} is `linear`: its module keeps its state in cache.linear_states")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def _map(self, fn) -> None:
        if self.state is not None:
            self.states[self.layer_idx] = _state_map(self.state, fn)

    def reset(self) -> None:
        self.states.pop(self.layer_idx, None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a `linear` layer's state cannot be cropped (its sums are not invertible)")

    def offload(self): ...
    def prefetch(self): ...


class HybridCache(Cache):
    """A transformers `Cache` for a model patched with any plan (see the module docstring).

    `plan`: the plan the model runs; by default read from its modules. Passing a plan that differs from the
    modules in place is refused, since the cache would then hold the wrong things.
    """

    def __init__(self, model, plan: LayerPlan | None = None):
        current = applied_plan(model)
        if plan is not None and plan != current:
            raise UserError(f"plan: the cache was asked for {plan} but the model runs {current}; apply it first")
        self.plan = current
        self.linear_states: dict[int, LinearState] = {}  # read and written by LinearSlidingWindowAttention
        config = model.config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers = []
        for index, option in enumerate(current.layers):
            if option == "softmax":  # what DynamicCache(config) would build for this layer
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_types[index]](**layer_kwargs[index]))
            elif option == "linear":
                layers.append(LinearStateLayer(self.linear_states, index))
            else:
                layers.append(DummyLayer())
        super().__init__(layers=layers)
        # Layers that know how many tokens were seen (an all-`none` plan has none: it uses no positions).
        self._counting = next((i for i, o in enumerate(current.layers) if o != "none"), None)

    @property
    def is_linear(self) -> list[bool]:
        return [isinstance(layer, LinearStateLayer) for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (any layer that keeps something knows; all of them agree)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, (CacheLayerMixin, LinearStateLayer)):
            if self._counting is None:
                return 0
            layer = self.layers[self._counting]
        return layer.get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, CacheLayerMixin):
            return layer.get_mask_sizes(query_length)
        # No softmax layer reads this mask; size it as a full layer's so that it matches the 2D padding mask.
        return self.get_seq_length() + query_length, 0

    def layer_bytes(self) -> list[int]:
        """Bytes each layer holds now (tensor elements times element size)."""
        sizes = []
        for layer in self.layers:
            if isinstance(layer, LinearStateLayer):
                sizes.append(layer.nbytes())
            elif isinstance(layer, CacheLayerMixin) and layer.is_initialized and layer.keys is not None:
                sizes.append(sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)))
            else:
                sizes.append(0)
        return sizes

    def kv_bytes(self) -> int:
        """Bytes the whole cache holds now, all sequences of the batch together."""
        return sum(self.layer_bytes())


@torch.inference_mode()
def hybrid_generate(model, input_ids: torch.Tensor, max_new_tokens: int, plan: LayerPlan | None = None,
                    **generate_kwargs) -> tuple[torch.Tensor, HybridCache]:
    """Greedy `model.generate` with a `HybridCache` for the plan in place; returns (all token ids, the cache).

    `input_ids` must be unpadded (`linear` layers do not read a padding mask).
    """
    cache = HybridCache(model, plan)
    generate_kwargs.setdefault("do_sample", False)
    ids = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), cache=cache,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         pad_token_id=model.config.pad_token_id, **generate_kwargs)
    return ids, cache
