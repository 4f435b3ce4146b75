"""Model family adapters: how to get post-RoPE q/k/v out of one family's attention module.

One file per family registers a `Family`; any other `model_type` is refused with the supported list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..inference.qkv import project_qkv
from ..registry import Registry

FAMILIES: Registry["Family"] = Registry("model family (config.model_type)")


@dataclass(frozen=True)
class Family:
    """What differs between decoder families for our purposes; everything else is shared."""

    model_type: str
    qk_norm: bool = False  # Qwen3 normalises q and k per head before RoPE

    def project_qkv(self, attn: nn.Module, hidden: torch.Tensor, position_embeddings):
        """hidden (B, S, hidden) -> q (B, Hq, S, D), k and v (B, Hkv, S, D), RoPE applied to q and k
        (`inference.qkv.project_qkv`, the path exported folders run, with this family's `qk_norm`)."""
        return project_qkv(attn, hidden, position_embeddings, self.qk_norm)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a *ForCausalLM model of this family."""
        return model.model.layers

    def position_embeddings(self, model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, layer: int):
        """(cos, sin) that decoder layer `layer` receives for `positions` (1, S); one RoPE for all layers here."""
        return model.model.rotary_emb(hidden, positions)

    def layer_kinds(self, model: nn.Module) -> list[str]:
        """Per layer, the original attention's reach: `global`, or `local:<window>` for sliding-window layers.

        Read from the config (`layer_types`, else `sliding_window` on every layer, as Mistral has), so it stays
        true whatever plan is applied."""
        config = model.config
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None) or [None] * len(self.decoder_layers(model))
        return [f"local:{window}" if window and kind in ("sliding_attention", None) else "global" for kind in types]

    def check(self, config) -> None:
        """Refuse a config this adapter cannot patch faithfully (one clear line); all are fine by default."""


def family_of(model_or_config) -> Family:
    """The registered family of a model or config; refuses unsupported families with one clear line."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UserError(
            f"model family: {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    family = FAMILIES.get(model_type)
    family.check(config)
    return family


def layer_kinds(model: nn.Module) -> list[str]:
    """Per layer of `model`, `global` or `local:<window>` (its original attention; see `Family.layer_kinds`)."""
    return family_of(model).layer_kinds(model)


# Registration happens on import of each family file.
from . import gemma3, llama, mistral, qwen2, qwen3  # noqa: E402,F401
