"""The hybrid generation cache: each layer keeps exactly what its option needs, and nothing more.

    softmax  the full K/V of every token seen (the transformers layer `DynamicCache(config)` would build: a
             sliding-window layer keeps only its window)
    linear   the `LinearState`: sinks' and last W tokens' K/V plus the constant-size linear sums
    mixed<k> the kept k KV heads' K/V as a softmax layer keeps them (growing, or a sliding layer's window),
             plus the `LinearState` of the other KV heads
    none     nothing

`LayerBoostCache(config, options)` builds one cache layer per decoder layer from `CACHE_LAYERS`, option name ->
factory; a new option that keeps something of its own adds an entry (and its layer class). A `linear` module
(and a mixed one, for its linear heads) keeps its own state in `cache.linear_states` (layer index ->
LinearState); this file only gives that dict a home inside a transformers `Cache`, so that masks, positions and
`generate` see the right sequence length whatever the plan.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DummyLayer, DynamicLayer,
                                      DynamicSlidingWindowLayer, get_layer_types_and_kwargs)

from .linear_kernels import LinearState
from .mixed_attention import MIXED_OPTIONS


class _StateSlot:
    """The slot of layer `layer_idx` in `states` (the dict layer -> LinearState that the modules write)."""

    def _attach(self, states: dict[int, LinearState], layer_idx: int) -> None:
        self.states, self.layer_idx = states, layer_idx

    @property
    def state(self) -> LinearState | None:
        return self.states.get(self.layer_idx)

    def _state_bytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes()

    def _map_state(self, fn) -> None:
        """`fn` applied to every tensor of the state; `fn` must return new tensors (decoding updates a state's
        buffers in place)."""
        if self.state is not None:
            self.states[self.layer_idx] = self.state.map(fn)

    def _drop_state(self) -> None:
        self.states.pop(self.layer_idx, None)

    def _refuse_crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError(f"layer {self.layer_idx} keeps a linear state, which cannot be cropped (its "
                                      "sums are not invertible)")


class LinearStateLayer(_StateSlot):
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
        self._attach(states, layer_idx)

    def update(self, *args, **kwargs):
        raise RuntimeError(f"layer {self.layer_idx} is `linear`: its module keeps its state in cache.linear_states")

    def get_seq_length(self) -> int:
        return 0 if self.state is None else self.state.position

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return self._state_bytes()

    def reset(self) -> None:
        self._drop_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse_crop(tokens_to_remove)

    def offload(self): ...
    def prefetch(self): ...


class MixedHeadsLayer(_StateSlot, DynamicLayer):
    """Cache slot of one mixed layer: the kept KV heads' K/V in a `DynamicLayer` (what `update` receives: only
    those heads), and a view on `states[layer_idx]`, the other heads' `LinearState`, which the module writes."""

    is_croppable = False  # the linear heads' sums cannot be rolled back

    def __init__(self, states: dict[int, LinearState], layer_idx: int, **layer_kwargs):
        super().__init__(**layer_kwargs)
        self._attach(states, layer_idx)

    def nbytes(self) -> int:
        return _kv_bytes(self) + self._state_bytes()

    def reset(self) -> None:
        super().reset()
        self._drop_state()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_state(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse_crop(tokens_to_remove)


class MixedHeadsSlidingLayer(MixedHeadsLayer, DynamicSlidingWindowLayer):
    """A mixed layer of a sliding-window layer: the kept heads keep only the window, as its softmax would."""


def softmax_layer(cache: "LayerBoostCache", layer_idx: int, layer_type: str, layer_kwargs: dict):
    """What `DynamicCache(config)` builds for this layer: full K/V, or the window of a sliding-window layer."""
    return DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**layer_kwargs)


def linear_layer(cache: "LayerBoostCache", layer_idx: int, layer_type: str, layer_kwargs: dict):
    return LinearStateLayer(cache.linear_states, layer_idx)


def mixed_layer(cache: "LayerBoostCache", layer_idx: int, layer_type: str, layer_kwargs: dict):
    """The softmax layer's kind (full, or sliding with its window) for the kept heads, plus the linear state."""
    kinds = {DynamicLayer: MixedHeadsLayer, DynamicSlidingWindowLayer: MixedHeadsSlidingLayer}
    base = DYNAMIC_LAYER_TYPE_MAPPING[layer_type]
    if base not in kinds:
        raise ValueError(f"layer {layer_idx} ({layer_type}) cannot be mixed: its softmax cache is a {base.__name__}")
    return kinds[base](cache.linear_states, layer_idx, **layer_kwargs)


def none_layer(cache: "LayerBoostCache", layer_idx: int, layer_type: str, layer_kwargs: dict):
    return DummyLayer()


# option name -> factory(cache, layer index, the layer's transformers layer type, its cache-layer kwargs)
CACHE_LAYERS: dict[str, Callable[..., object]] = {"softmax": softmax_layer, "linear": linear_layer,
                                                  "none": none_layer, **{name: mixed_layer for name in MIXED_OPTIONS}}


class LayerBoostCache(Cache):
    """A transformers `Cache` for a hybrid running `options` (one option name per decoder layer; by default the
    text config's `layerboost_plan`, as an exported folder's config.json stores it)."""

    def __init__(self, config, options: Sequence[str] | None = None):
        text = config.get_text_config(decoder=True)
        self.options = tuple(text.layerboost_plan if options is None else options)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        unknown = sorted({option for option in self.options if option not in CACHE_LAYERS})
        if unknown or len(self.options) != len(layer_types):
            raise ValueError(f"the hybrid cache needs one of {tuple(CACHE_LAYERS)} per layer ({len(layer_types)} "
                             f"layers), got {list(self.options)}")
        self.linear_states: dict[int, LinearState] = {}  # read and written by the linear and mixed modules
        super().__init__(layers=[CACHE_LAYERS[option](self, index, layer_types[index], layer_kwargs[index])
                                 for index, option in enumerate(self.options)])
        # A layer that knows how many tokens were seen (an all-`none` plan has none: it uses no positions).
        self._counting = next((i for i, layer in enumerate(self.layers) if not isinstance(layer, DummyLayer)), None)

    @property
    def is_linear(self) -> list[bool]:
        return [isinstance(layer, LinearStateLayer) for layer in self.layers]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (any layer that keeps something knows; all of them agree)."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is None or isinstance(layer, DummyLayer):
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
        return [_layer_bytes(layer) for layer in self.layers]

    def kv_bytes(self) -> int:
        """Bytes the whole cache holds now, all sequences of the batch together."""
        return sum(self.layer_bytes())


def _layer_bytes(layer) -> int:
    """What one cache layer holds: its own count where it keeps one (`nbytes`), else its K/V tensors."""
    return layer.nbytes() if hasattr(layer, "nbytes") else _kv_bytes(layer)


def _kv_bytes(layer) -> int:
    if isinstance(layer, CacheLayerMixin) and layer.is_initialized and layer.keys is not None:
        return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    return 0
