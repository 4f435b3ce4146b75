"""LayerPlan: one attention option per layer. A frozen value with a compact string form and a stable id.

The JSON form (schema `layerboost.plan/v1`) carries the plan's context: which model it is for (name, source,
fingerprint, layer count), option settings, bank id, metrics with fidelity and workload, and provenance.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .attention import OPTIONS, option_by_code
from .errors import UserError, did_you_mean

PLAN_SCHEMA = "layerboost.plan/v1"


@dataclass(frozen=True)
class LayerPlan:
    """One option name per decoder layer, e.g. LayerPlan(("softmax", "linear", "none"))."""

    layers: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise UserError("plan: a plan needs at least one layer")
        for index, name in enumerate(self.layers):
            if name not in OPTIONS:
                raise UserError(f"plan: layer {index} has unknown option {name!r}; {did_you_mean(name, OPTIONS)}")
        # the compact form, once: the search and its surrogates key, compare and print plans by it constantly
        object.__setattr__(self, "_text", "".join(OPTIONS.get(n).code for n in self.layers))

    @classmethod
    def uniform(cls, option: str, num_layers: int) -> "LayerPlan":
        return cls((option,) * num_layers)

    @classmethod
    def from_string(cls, text: str) -> "LayerPlan":
        """Parse the compact form, one option code per layer ('SSLN...')."""
        codes = {OPTIONS.get(n).code: n for n in OPTIONS}
        names = []
        for index, code in enumerate(text.strip()):
            if code not in codes:
                raise UserError(
                    f"plan: character {index} is {code!r}, not an option code; allowed: "
                    + ", ".join(f"{c} ({n})" for c, n in sorted(codes.items()))
                )
            names.append(codes[code])
        return cls(tuple(names))

    def __str__(self) -> str:
        return self._text

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def id(self) -> str:
        """Stable short id: depends only on the per-layer options."""
        return hashlib.sha256(str(self).encode()).hexdigest()[:12]

    def count(self, option: str) -> int:
        return sum(1 for name in self.layers if name == option)

    def check_layers(self, num_layers: int) -> "LayerPlan":
        if len(self) != num_layers:
            raise UserError(f"plan: has {len(self)} layers but the model has {num_layers}")
        return self

    def to_json(self, **context: Any) -> dict:
        """Plan JSON; `context` adds model, settings, bank_id, metrics, origin (see DESIGN.md)."""
        return {"schema": PLAN_SCHEMA, "plan": str(self), "id": self.id, "num_layers": len(self),
                "layers": list(self.layers), **context}

    @classmethod
    def from_json(cls, data: dict, model_info: dict | None = None) -> "LayerPlan":
        """Read plan JSON; with `model_info` (name, fingerprint, num_layers) refuse plans made for another model."""
        if data.get("schema") != PLAN_SCHEMA:
            raise UserError(f"plan: schema is {data.get('schema')!r}, expected {PLAN_SCHEMA!r}")
        if not isinstance(data.get("layers"), list):
            raise UserError("plan: JSON has no 'layers' list of option names")
        plan = cls(tuple(data["layers"]))
        if model_info is not None:
            plan.check_layers(model_info["num_layers"])
            made_for = (data.get("model") or {}).get("fingerprint")
            if made_for and made_for != model_info["fingerprint"]:
                raise UserError(
                    f"plan: made for model fingerprint {made_for} ({(data.get('model') or {}).get('name')}), "
                    f"but the loaded model {model_info['name']} has fingerprint {model_info['fingerprint']}"
                )
        return plan


def load_plan(spec: str, model_info: dict | None = None) -> LayerPlan:
    """A plan from a JSON file path, or from the compact string form."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"plan: file {spec!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"plan: {spec!r} is not valid JSON ({error})") from None
        return LayerPlan.from_json(data, model_info)
    plan = LayerPlan.from_string(spec)
    return plan.check_layers(model_info["num_layers"]) if model_info else plan


def plan_from_names(names: Iterable[str]) -> LayerPlan:
    return LayerPlan(tuple(names))


__all__ = ["LayerPlan", "PLAN_SCHEMA", "load_plan", "plan_from_names", "option_by_code"]
