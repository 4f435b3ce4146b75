"""Attention options: what one layer's attention becomes. A new option is one registered file.

Each option builds a module that replaces a decoder layer's `self_attn`. The module takes the same
arguments as the family's attention module and returns `(output, None)`, so the decoder layer is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..registry import Registry


@dataclass(frozen=True)
class AttentionOption:
    """A registered option: its name, its one-letter code in plan strings, and how to build it.

    `build(attn, family, settings)` returns the module that replaces `attn` (the layer's original attention).
    `trainable` options own parameters that attention transfer trains and the bank stores. `defaults`: the
    option's settings (`attention.<name>.*`) when none are given: the one place they are written.
    """

    name: str
    code: str
    build: Callable[..., nn.Module]
    trainable: bool = False
    defaults: dict = field(default_factory=dict)


OPTIONS: Registry[AttentionOption] = Registry("attention option")


def register_option(option: AttentionOption) -> AttentionOption:
    if any(OPTIONS.get(n).code == option.code for n in OPTIONS):
        raise ValueError(f"option code {option.code!r} is used twice")
    return OPTIONS.register(option.name)(option)


def option_by_code(code: str) -> AttentionOption:
    for name in OPTIONS:
        if OPTIONS.get(name).code == code:
            return OPTIONS.get(name)
    raise KeyError(code)


from . import linear, none, softmax  # noqa: E402,F401  (registration on import)
