"""Apply a plan to a loaded model in place. Switching plans only re-points each layer's `self_attn`."""
from __future__ import annotations

import torch
from torch import nn

from .attention import OPTIONS
from .families import family_of
from .plan import LayerPlan


class PlanSwitcher:
    """Owns, for one model, every layer's module for every option, built once; `apply` re-points layers.

    The `softmax` module of each layer is the model's original attention, so the all-softmax plan is the
    unpatched model exactly. Modules of trainable options get their weights from the bank (`load_bank`); an
    option that builds on another (`AttentionOption.builds_on`: `mixed<k>` on `linear`) is made from that
    option's module of the same layer, built first, and shares its parts, so the bank reaches it too.
    """

    def __init__(self, model: nn.Module, settings: dict):
        self.model = model
        self.family = family_of(model)
        self.layers = self.family.decoder_layers(model)
        self.settings = settings
        self.original = [layer.self_attn for layer in self.layers]
        self._modules: list[dict[str, nn.Module]] = [{} for _ in self.layers]
        self.plan = LayerPlan.uniform("softmax", len(self.layers))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def module(self, layer: int, option: str) -> nn.Module:
        """The module layer `layer` uses under `option` (built on first use)."""
        built = self._modules[layer]
        if option not in built:
            spec = OPTIONS.get(option)
            base = {"base": self.module(layer, spec.builds_on)} if spec.builds_on else {}
            # Built outside inference mode even when first applied inside it (latency measurement), so the
            # option's parameters stay normal tensors that attention transfer can later train.
            with torch.inference_mode(False):
                built[option] = spec.build(self.original[layer], self.family, self.settings.get(option, {}), **base)
        return built[option]

    def apply(self, plan: LayerPlan) -> None:
        plan.check_layers(self.num_layers)
        for index, (layer, option) in enumerate(zip(self.layers, plan.layers)):
            layer.self_attn = self.module(index, option)
        self.plan = plan

    def trainable_parts(self, option: str) -> list[nn.Module]:
        """Per layer, the learned parts of a trainable option (what the bank stores)."""
        return [self.module(i, option).learned for i in range(self.num_layers)]

    def load_bank(self, bank) -> None:
        for option, per_layer in bank.parts.items():
            for part, state in zip(self.trainable_parts(option), per_layer):
                part.load_state_dict(state)

    def restore(self) -> None:
        """Put the original attention back in every layer."""
        self.apply(LayerPlan.uniform("softmax", self.num_layers))
