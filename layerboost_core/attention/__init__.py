"""Attention options: what one layer's attention becomes. A new option is one registered file.

Each option builds a module that replaces a decoder layer's `self_attn`. The module takes the same
arguments as the family's attention module and returns `(output, None)`, so the decoder layer is untouched.
An option may build on another option's module of the same layer (`builds_on`): the `mixed` options reuse the
layer's `linear` module (its projections and learned parts), so the bank serves them too.
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
    `builds_on`: the option whose module of the same layer this one is made from; `build` then also receives
    that module as `base=` and shares its parts. `min_kv_heads`: the fewest KV heads a model must have for the
    option to mean anything (a `mixed<k>` option keeps k of them softmax and needs one more to replace).
    """

    name: str
    code: str
    build: Callable[..., nn.Module]
    trainable: bool = False
    defaults: dict = field(default_factory=dict)
    builds_on: str | None = None
    min_kv_heads: int = 1


OPTIONS: Registry[AttentionOption] = Registry("attention option")


def register_option(option: AttentionOption) -> AttentionOption:
    if any(OPTIONS.get(n).code == option.code for n in OPTIONS):
        raise ValueError(f"option code {option.code!r} is used twice")
    return OPTIONS.register(option.name)(option)


def bank_option(name: str) -> str | None:
    """The trainable option whose learned parts (the bank's) a layer under option `name` runs: the option itself
    when it is trainable, the option it builds on when that one is, else None."""
    spec = OPTIONS.get(name)
    if spec.trainable:
        return name
    return bank_option(spec.builds_on) if spec.builds_on else None


def option_by_code(code: str) -> AttentionOption:
    for name in OPTIONS:
        if OPTIONS.get(name).code == code:
            return OPTIONS.get(name)
    raise KeyError(code)


from . import linear, mixed, none, softmax  # noqa: E402,F401  (registration on import)
