"""LayerBoost hybrid decoders for plain transformers (`trust_remote_code=True`); needs only torch and transformers.

Copied into every exported folder next to the project's `inference/` modules it imports (the attention modules,
their kernels and the hybrid cache, verbatim: the folder runs the code the project measured) and loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. `config.json` names the family's
layerboost config (`model_type: layerboost_<family>`, so that loading without `trust_remote_code` fails loudly
instead of silently running every layer as softmax) and stores `layerboost_plan` (one option per layer) and
`layerboost_settings`. Per layer, the attention becomes:

    softmax  the family's own attention, unchanged; the cache keeps its K/V (a local layer: its window)
    linear   softmax over the first `sinks` and the last `window` tokens plus linear attention with a learned
             Hedgehog feature map over the rest; the cache keeps sinks + window K/V and a constant-size state
    mixed<k> per layer, the k KV heads `layerboost_settings["mixed<k>"]["kept_heads"]` names keep the family's
             softmax (a local layer's window included), the other heads are `linear`; the cache keeps the kept
             heads' K/V and the other heads' state
    none     nothing: the sublayer adds zero to the residual stream and keeps no cache

This file holds only what loading needs: a layerboost config and model class per family (`CLASSES`), the
mixin that installs the plan, and the cache checks. Generation uses `LayerBoostCache` by default; a cache of
any other kind (e.g. a `DynamicCache`, which would be silently wrong for `linear` layers) is refused.
"""
from __future__ import annotations

from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.mistral.modeling_mistral import MistralForCausalLM
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM
from transformers.models.qwen3.configuration_qwen3 import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from .hybrid_cache import LayerBoostCache
from .linear_attention import LinearSlidingWindowAttention
from .mixed_attention import MIXED_OPTIONS, MixedHeadAttention
from .no_attention import NoAttention

# option -> build(the layer's own attention, all options' settings, the family's qk_norm): its new attention
MODULES = {
    "softmax": lambda attn, settings, qk_norm: attn,
    "linear": lambda attn, settings, qk_norm: LinearSlidingWindowAttention.from_settings(attn, settings["linear"],
                                                                                          qk_norm),
    "none": lambda attn, settings, qk_norm: NoAttention(attn.layer_idx),
    **{name: (lambda attn, settings, qk_norm, name=name: MixedHeadAttention.from_settings(attn, settings, name, qk_norm))
       for name in MIXED_OPTIONS},
}
# Options whose layers read no padding mask (their linear heads), so a padded batch is refused.
NO_PADDING = ("linear", *MIXED_OPTIONS)
# Plan codes, for messages (the project's option registry holds the same; a test checks they agree).
CODES = {"softmax": "S", "linear": "L", "none": "N", **{name: str(k) for name, k in MIXED_OPTIONS.items()}}


class LayerBoostMixin:
    """Turns a family's *ForCausalLM into the hybrid its config's plan describes; cache handling for generate."""

    qk_norm = False  # the family normalises q and k per head before RoPE (set per family in CLASSES)

    def __init__(self, config):
        super().__init__(config)
        self._install_plan()

    def _install_plan(self) -> None:
        plan, layers = tuple(self.config.layerboost_plan), self.model.layers
        if len(plan) != len(layers) or any(option not in MODULES for option in plan):
            raise ValueError(f"layerboost_plan must name one of {tuple(MODULES)} per layer ({len(layers)} layers), "
                             f"got {list(plan)}")
        settings = self.config.layerboost_settings
        for layer, option in zip(layers, plan):
            layer.self_attn = MODULES[option](layer.self_attn, settings, self.qk_norm)

    def check_cache(self, cache) -> None:
        """Refuse a cache that cannot serve this plan (anything but a LayerBoostCache made for it)."""
        plan = tuple(self.config.layerboost_plan)
        if not isinstance(cache, LayerBoostCache) or cache.options != plan:
            raise ValueError(f"this LayerBoost hybrid (plan {''.join(CODES[o] for o in plan)}) needs its own "
                             f"cache: pass LayerBoostCache(model.config) or no cache at all, not "
                             f"{type(cache).__name__}" + (f" for plan {list(cache.options)}"
                                                           if isinstance(cache, LayerBoostCache) else ""))

    def _check_mask(self, attention_mask) -> None:
        """`linear` and mixed layers read no padding mask: a padded batch would be silently wrong, so it is refused."""
        if (any(option in NO_PADDING for option in self.config.layerboost_plan) and attention_mask is not None
                and attention_mask.dim() == 2 and not bool(attention_mask.all())):
            raise ValueError("padded batches are not supported by `linear` and mixed layers (they read no padding "
                             "mask); run unpadded sequences")

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


def _hybrid_classes(config_base: type, model_base: type, qk_norm: bool) -> tuple[type, type]:
    """(LayerBoost<Config>, LayerBoost<Model>): the family's config under model_type `layerboost_<family>`
    (`layerboost_plan` and `layerboost_settings` are plain config fields) and its model with the mixin."""
    config_name, model_name = f"LayerBoost{config_base.__name__}", f"LayerBoost{model_base.__name__}"
    config_class = type(config_name, (config_base,), {"model_type": f"layerboost_{config_base.model_type}",
                                                      "__module__": __name__, "__qualname__": config_name})
    model_class = type(model_name, (LayerBoostMixin, model_base), {"config_class": config_class, "qk_norm": qk_norm,
                                                                   "__module__": __name__, "__qualname__": model_name})
    return config_class, model_class


# family model_type -> (config class, model class): one row per family the project supports (a test checks the
# keys and qk_norm against the project's registry); the exporter names these classes in config.json's auto_map.
CLASSES = {
    "llama": _hybrid_classes(LlamaConfig, LlamaForCausalLM, qk_norm=False),
    "qwen2": _hybrid_classes(Qwen2Config, Qwen2ForCausalLM, qk_norm=False),
    "qwen3": _hybrid_classes(Qwen3Config, Qwen3ForCausalLM, qk_norm=True),
    "mistral": _hybrid_classes(MistralConfig, MistralForCausalLM, qk_norm=False),
    # Local and global layers: the decoder layers hand self_attn each layer type's RoPE, and LayerBoostCache
    # keeps a local softmax layer's window, as transformers' own cache would.
    "gemma3_text": _hybrid_classes(Gemma3TextConfig, Gemma3ForCausalLM, qk_norm=True),
}
# Module attributes under their own names: transformers finds auto_map's "modeling_layerboost.<name>" here.
globals().update({cls.__name__: cls for classes in CLASSES.values() for cls in classes})
