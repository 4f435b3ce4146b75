"""The qwen2 family: standard GQA attention with RoPE (the shared path in `Family`)."""
from . import FAMILIES, Family

FAMILIES.register("qwen2")(Family("qwen2"))
