"""The Gemma 3 family (`gemma3_text`, i.e. `Gemma3ForCausalLM`): layers that already mix local and global attention.

What differs from llama, and where each difference is handled:

* q/k norms: Gemma's RMSNorm scales by (1 + weight); calling the layer's own `q_norm` / `k_norm` modules
  (`qk_norm=True`) reuses exactly that.
* RoPE per layer type: local (`sliding_attention`) layers rotate with `rope_local_base_freq` (10 000), global
  (`full_attention`) layers with `rope_theta` (1 000 000). The model computes both tables and hands each decoder
  layer its own, so options receive the right one through `position_embeddings`; only callers that build the
  tables themselves need `position_embeddings(...)` below.
* Scaling: `query_pre_attn_scalar ** -0.5`, not `head_dim ** -0.5`. The attention module stores it as
  `scaling`, which the `linear` option reads.
* Sliding window on local layers: applied by the model's per-layer-type masks, so `softmax` (the original
  module, unchanged) keeps each layer's window; `linear` and `none` ignore masks (unpadded input).
* Attention logit softcapping: null in Gemma 3. The `linear` kernels do not apply it, so a config that sets it
  is refused rather than approximated silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from . import FAMILIES, Family


@dataclass(frozen=True)
class Gemma3Family(Family):
    """Gemma 3: the shared q/k/v path with q/k norms, plus RoPE chosen by each layer's type."""

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        """The (cos, sin) of layer `layer`'s own type: local and global layers use different RoPE bases."""
        return model.model.rotary_emb(hidden, positions, model.config.layer_types[layer])

    def check(self, config) -> None:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UserError(f"model family: gemma3_text with attn_logit_softcapping="
                            f"{config.attn_logit_softcapping} is not supported (the linear option does not softcap)")


FAMILIES.register("gemma3_text")(Gemma3Family("gemma3_text", qk_norm=True))
