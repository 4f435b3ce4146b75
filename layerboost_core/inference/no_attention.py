"""The `none` option's module: attention removed. The sublayer adds nothing and keeps no cache."""
from __future__ import annotations

import torch
from torch import nn


class NoAttention(nn.Module):
    """Returns zeros, so the decoder layer's residual passes through unchanged."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return torch.zeros_like(hidden_states), None
