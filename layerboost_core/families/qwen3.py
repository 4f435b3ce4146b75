"""The qwen3 family: like llama, plus per-head RMSNorm on q and k before RoPE."""
from . import FAMILIES, Family

FAMILIES.register("qwen3")(Family("qwen3", qk_norm=True))
