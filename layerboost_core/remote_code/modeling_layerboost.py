"""LayerBoost hybrid decoders for plain transformers (`trust_remote_code=True`); needs only torch and transformers.

Copied into every exported folder next to `linear_kernels.py` (the project's attention kernels, verbatim, so the
math cannot drift) and loaded with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
`config.json` names the family's layerboost config (`model_type: layerboost_<family>`, so that loading without
`trust_remote_code` fails loudly instead of silently running every layer as softmax) and stores
`layerboost_plan` (one option per layer) and `layerboost_settings`. Per layer, the attention becomes:

    softmax  the family's own attention, unchanged; the cache keeps its full K/V
    linear   softmax over the first `sinks` and the last `window` tokens plus linear attention with a learned
             Hedgehog feature map over the rest; the cache keeps sinks + window K/V and a constant-size state
    none     nothing: the sublayer adds zero to the residual stream and keeps no cache

Generation uses `LayerBoostCache` by default; a cache of any other kind (e.g. a `DynamicCache`, which would be
silently wrong for `linear` layers) is refused.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, DummyLayer,
                                      get_layer_types_and_kwargs)
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .linear_kernels import LinearState, chunked_prefill, decode_step

OPTIONS = ("softmax", "linear", "none")


# ----------------------------------------------------------------------------------------------- attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D), cos/sin (B, S, D): rotary embedding as all four families apply it."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class HedgehogFeatureMap(nn.Module):
    """phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] per head: positive, 2F features."""

    def __init__(self, heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, head_dim, feature_dim))  # loaded from the checkpoint
        self.bias = nn.Parameter(torch.zeros(heads, 1, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.matmul(x, self.weight) + self.bias  # (B, H, S, D) @ (H, D, F) -> (B, H, S, F)
        return torch.softmax(torch.stack([z, -z], dim=-2), dim=-1).flatten(-2)  # (B, H, S, 2F)


class LearnedLinearParts(nn.Module):
    """The trained parts of one `linear` layer: q and k feature maps and a per-head gate."""

    def __init__(self, q_heads: int, kv_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.feature_q = HedgehogFeatureMap(q_heads, head_dim, feature_dim)
        self.feature_k = HedgehogFeatureMap(kv_heads, head_dim, feature_dim)
        self.gate_logit = nn.Parameter(torch.zeros(q_heads))
        self._stacked = None  # (key, weight, bias) of `_stacked_maps`; not part of the state dict

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def one_token_features(self, q: torch.Tensor, k: torch.Tensor):
        """(phi_q(q), phi_k(k)) of one position, q (B, Hq, 1, D), k (B, Hkv, 1, D): both maps and both signs in
        one batched matmul and one softmax, which is what keeps a decode step cheap."""
        weight, bias = self._stacked_maps()
        b, hq, _, d = q.shape
        h = weight.shape[0]
        x = torch.cat([q.reshape(b, hq, d), k.reshape(b, h - hq, d)], dim=1).transpose(0, 1)  # (H, B, D)
        z = torch.baddbmm(bias, x, weight).view(h, b, 2, -1)
        phi = torch.softmax(z, dim=-1).view(h, b, 1, -1).transpose(0, 1)  # (B, H, 1, 2F)
        return phi[:, :hq], phi[:, hq:]

    def _stacked_maps(self):
        """[W, -W] / [b, -b] of the q map then the k map, (Hq + Hkv, D, 2F) / (Hq + Hkv, 1, 2F); rebuilt whenever
        a parameter is replaced, moved or updated in place (keyed on storage and version counter)."""
        # Plain dict lookups: nn.Module.__getattr__ would cost more than the whole cache check (every step).
        q_params, k_params = self._modules["feature_q"]._parameters, self._modules["feature_k"]._parameters
        params = (q_params["weight"], q_params["bias"], k_params["weight"], k_params["bias"])
        key = (params[0].dtype, *(p.data_ptr() for p in params), *(p._version for p in params))
        if self._stacked is None or self._stacked[0] != key or torch.is_grad_enabled():
            wq, bq, wk, bk = (p.detach() if not torch.is_grad_enabled() else p for p in params)
            weight = torch.cat([torch.cat([wq, -wq], dim=-1), torch.cat([wk, -wk], dim=-1)], dim=0)
            bias = torch.cat([torch.cat([bq, -bq], dim=-1), torch.cat([bk, -bk], dim=-1)], dim=0)
            if torch.is_grad_enabled():  # differentiable: never cached
                return weight, bias
            self._stacked = (key, weight, bias)
        return self._stacked[1], self._stacked[2]


class LinearSlidingWindowAttention(nn.Module):
    """A `linear` layer: reuses the family attention's q/k/v/o projections (and q/k norms), RoPE and GQA."""

    def __init__(self, attn: nn.Module, window: int, feature_dim: int, sinks: int):
        super().__init__()
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.window, self.sinks = window, sinks
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.qk_norm = hasattr(attn, "q_norm")  # Qwen3 normalises q and k per head before RoPE
        if self.qk_norm:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        q_heads = attn.q_proj.out_features // attn.head_dim
        kv_heads = attn.k_proj.out_features // attn.head_dim
        self.learned = LearnedLinearParts(q_heads, kv_heads, attn.head_dim, feature_dim)

    def project_qkv(self, hidden: torch.Tensor, position_embeddings):
        """hidden (B, S, hidden) -> q (B, Hq, S, D), k and v (B, Hkv, S, D), RoPE applied to q and k."""
        batch, seq = hidden.shape[:2]
        q = self.q_proj(hidden).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(hidden).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(hidden).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        return _apply_rope(q.transpose(1, 2), cos, sin), _apply_rope(k.transpose(1, 2), cos, sin), v

    def attend(self, q, k, v, state: LinearState | None):
        """Post-RoPE q/k/v (B, H, S, D) -> (y (B, Hq, S, D), state after the last token). A state passed in may
        be updated in place: only the returned one is valid."""
        learned = self.learned
        gate = learned.gate()
        if state is None:  # prefill: chunked, linear in S
            return chunked_prefill(q, k, v, learned.feature_q(q), learned.feature_k(k), gate, self.window,
                                   self.scaling, self.sinks, return_state=True)
        if q.shape[2] == 1:  # one decode step: the lean path
            fq, fk = learned.one_token_features(q, k)
            return decode_step(q, k, v, fq, fk, gate, self.window, self.scaling, state, self.sinks)
        fq, fk = learned.feature_q(q), learned.feature_k(k)
        outputs = []
        for t in range(q.shape[2]):  # a multi-token continuation runs the recurrence token by token
            sl = slice(t, t + 1)
            y, state = decode_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], fq[:, :, sl], fk[:, :, sl], gate,
                                   self.window, self.scaling, state, self.sinks)
            outputs.append(y)
        return torch.cat(outputs, dim=2), state

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        if cache is None:
            y = chunked_prefill(q, k, v, self.learned.feature_q(q), self.learned.feature_k(k), self.learned.gate(),
                                self.window, self.scaling, self.sinks)
        else:
            y, cache.linear_states[self.layer_idx] = self.attend(q, k, v, cache.linear_states.get(self.layer_idx))
        y = y.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)  # (B, S, Hq*D)
        return self.o_proj(y), None


class NoAttention(nn.Module):
    """A `none` layer: returns zeros, so the decoder layer's residual passes through unchanged."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


# ----------------------------------------------------------------------------------------------- cache


class LinearStateLayer:
    """Cache slot of one `linear` layer: a view on `states[layer_idx]`, which the layer's module writes. Not a
    `CacheLayerMixin`: it holds no growing K/V (mask sizing and offloading skip it)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False  # a recurrent sum cannot be rolled back
    supports_early_init = False
    is_initialized = True
    keys = values = None

    def __init__(self, states: dict, layer_idx: int):
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
            self.states[self.layer_idx] = self.state.map(fn)

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


class LayerBoostCache(Cache):
    """Per layer exactly what its option needs: softmax full K/V (the layer `DynamicCache` would build),
    linear a `LinearState` (sinks + window K/V and the linear sums, in `linear_states`), none nothing."""

    def __init__(self, config):
        text = config.get_text_config(decoder=True)
        self.plan = tuple(text.layerboost_plan)
        self.linear_states: dict[int, LinearState] = {}  # read and written by LinearSlidingWindowAttention
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text)
        layers = []
        for index, option in enumerate(self.plan):
            if option == "softmax":
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_types[index]](**layer_kwargs[index]))
            elif option == "linear":
                layers.append(LinearStateLayer(self.linear_states, index))
            else:
                layers.append(DummyLayer())
        super().__init__(layers=layers)
        # A layer that counts the tokens seen (an all-`none` plan has none: it uses no positions).
        self._counting = next((i for i, o in enumerate(self.plan) if o != "none"), None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (every layer that keeps something agrees)."""
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
        # No softmax layer reads this mask; sized as a full layer's so that it matches the 2D padding mask.
        return self.get_seq_length() + query_length, 0

    def layer_bytes(self) -> list[int]:
        """Bytes each layer holds now."""
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


# ----------------------------------------------------------------------------------------------- models


class LayerBoostMixin:
    """Turns a family's *ForCausalLM into the hybrid its config's plan describes; cache handling for generate."""

    def _install_plan(self) -> None:
        plan, layers = self.config.layerboost_plan, self.model.layers
        if len(plan) != len(layers) or any(option not in OPTIONS for option in plan):
            raise ValueError(f"layerboost_plan must name one of {OPTIONS} per layer ({len(layers)} layers), "
                             f"got {plan}")
        linear = self.config.layerboost_settings.get("linear", {})
        for layer, option in zip(layers, plan):
            if option == "linear":
                layer.self_attn = LinearSlidingWindowAttention(layer.self_attn, int(linear["window"]),
                                                               int(linear["feature_dim"]),
                                                               int(linear.get("sinks", 0)))
            elif option == "none":
                layer.self_attn = NoAttention(layer.self_attn.layer_idx)

    def check_cache(self, cache) -> None:
        """Refuse a cache that cannot serve this plan (anything but a LayerBoostCache made for it)."""
        plan = tuple(self.config.layerboost_plan)
        if not isinstance(cache, LayerBoostCache) or cache.plan != plan:
            raise ValueError(f"this LayerBoost hybrid (plan {''.join(o[0].upper() for o in plan)}) needs its own "
                             f"cache: pass LayerBoostCache(model.config) or no cache at all, not "
                             f"{type(cache).__name__}" + (f" for plan {cache.plan}" if isinstance(cache, LayerBoostCache)
                                                           else ""))

    def _check_mask(self, attention_mask) -> None:
        """`linear` layers read no padding mask: a padded batch would be silently wrong, so it is refused."""
        if ("linear" in self.config.layerboost_plan and attention_mask is not None and attention_mask.dim() == 2
                and not bool(attention_mask.all())):
            raise ValueError("padded batches are not supported by `linear` layers (they read no padding mask); "
                             "run unpadded sequences")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        """The family's forward with a LayerBoostCache made on demand (when caching) and any other refused.
        Same parameters as the family's: `generate` reads them (e.g. `logits_to_keep`) from this signature."""
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        self._check_mask(attention_mask)
        if cache is not None:
            self.check_cache(cache)
        elif use_cache if use_cache is not None else (self.config.use_cache and not self.training):
            cache = LayerBoostCache(self.config)  # the family would make a DynamicCache, wrong for `linear`
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """`generate` builds a LayerBoostCache by default; a user's cache must be one for this plan."""
        user_cache = model_kwargs.get("cache")
        if user_cache is None and model_kwargs.get("past_key_values") is not None:
            user_cache = model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        if user_cache is not None:
            self.check_cache(user_cache)
            user_cache._is_user_defined = True  # what generate does with a user cache: it is returned
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} is not supported "
                             "by a LayerBoost hybrid: it generates with its own LayerBoostCache")
        model_kwargs["cache"] = LayerBoostCache(self.config)


def _config_class(base: type) -> type:
    """The family's config plus `layerboost_plan` and `layerboost_settings` (kept as plain config fields)."""
    return type(f"LayerBoost{base.__name__}", (base,), {"model_type": f"layerboost_{base.model_type}",
                                                        "__module__": __name__})


LayerBoostLlamaConfig = _config_class(LlamaConfig)
LayerBoostQwen2Config = _config_class(Qwen2Config)
LayerBoostQwen3Config = _config_class(Qwen3Config)
LayerBoostMistralConfig = _config_class(MistralConfig)


class LayerBoostLlamaForCausalLM(LayerBoostMixin, LlamaForCausalLM):
    config_class = LayerBoostLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_plan()


class LayerBoostQwen2ForCausalLM(LayerBoostMixin, Qwen2ForCausalLM):
    config_class = LayerBoostQwen2Config

    def __init__(self, config):
        super().__init__(config)
        self._install_plan()


class LayerBoostQwen3ForCausalLM(LayerBoostMixin, Qwen3ForCausalLM):
    config_class = LayerBoostQwen3Config

    def __init__(self, config):
        super().__init__(config)
        self._install_plan()


class LayerBoostMistralForCausalLM(LayerBoostMixin, MistralForCausalLM):
    config_class = LayerBoostMistralConfig

    def __init__(self, config):
        super().__init__(config)
        self._install_plan()


# family model_type -> (config class, model class): what the exporter names in config.json's auto_map
CLASSES = {
    "llama": (LayerBoostLlamaConfig, LayerBoostLlamaForCausalLM),
    "qwen2": (LayerBoostQwen2Config, LayerBoostQwen2ForCausalLM),
    "qwen3": (LayerBoostQwen3Config, LayerBoostQwen3ForCausalLM),
    "mistral": (LayerBoostMistralConfig, LayerBoostMistralForCausalLM),
}
