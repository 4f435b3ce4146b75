"""`softmax`: the layer's original attention, unchanged (the module itself is reused)."""
from . import AttentionOption, register_option


def build_softmax(attn, family, settings):
    return attn


SOFTMAX = register_option(AttentionOption("softmax", "S", build_softmax))
