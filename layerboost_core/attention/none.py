"""`none`: attention removed. The sublayer adds nothing to the residual stream and keeps no cache."""
import torch
from torch import nn

from . import AttentionOption, register_option


class NoAttention(nn.Module):
    """Returns zeros, so the decoder layer's residual passes through unchanged."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


NONE = register_option(AttentionOption("none", "N", lambda attn, family, settings: NoAttention(attn.layer_idx)))
