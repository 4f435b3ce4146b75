"""`none`: attention removed. The sublayer adds nothing to the residual stream and keeps no cache.

The module (`NoAttention`) lives in `inference/no_attention.py`, which exported folders ship."""
from ..inference.no_attention import NoAttention
from . import AttentionOption, register_option

NONE = register_option(AttentionOption("none", "N", lambda attn, family, settings: NoAttention(attn.layer_idx)))
