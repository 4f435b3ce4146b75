"""`linear`: sliding-window softmax over the last W tokens (plus a few sink tokens) + linear attention over
the rest.

The module (`LinearSlidingWindowAttention`, with the learned parts the bank stores) lives in
`inference/linear_attention.py`, which exported folders ship; this file registers the option and validates
its settings.
"""
from __future__ import annotations

from ..errors import UserError
from ..inference.linear_attention import LinearSlidingWindowAttention
from . import AttentionOption, register_option


def build_linear(attn, family, settings):
    for key in ("window", "feature_dim"):
        if key not in settings or int(settings[key]) < 1:
            raise UserError(f"attention.linear.{key}: {settings.get(key)!r} must be a positive integer")
    if int(settings.get("sinks", 0)) < 0:
        raise UserError(f"attention.linear.sinks: {settings['sinks']!r} must be >= 0")
    return LinearSlidingWindowAttention.from_settings(attn, settings, qk_norm=family.qk_norm)


# window 64: softmax over the last 64 tokens; feature_dim 32: Hedgehog maps of 2 x 32 features per head;
# sinks 4: the first tokens always kept in the softmax set (attention sinks).
LINEAR = register_option(AttentionOption("linear", "L", build_linear, trainable=True,
                                         defaults={"window": 64, "feature_dim": 32, "sinks": 4}))
