"""The mistral family: standard GQA attention with RoPE (the shared path in `Family`)."""
from . import FAMILIES, Family

FAMILIES.register("mistral")(Family("mistral"))
