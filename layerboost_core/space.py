"""The search space as a plain value: per layer the allowed options, pinned layers and option-count bounds.

The Optuna side (distributions, suggesting a plan from a trial) lives in layerboost_search.space."""
from __future__ import annotations

from dataclasses import dataclass, field

from .attention import OPTIONS
from .errors import UserError, did_you_mean
from .plan import LayerPlan


def layer_param(index: int) -> str:
    return f"layer_{index:03d}"


@dataclass(frozen=True)
class SearchSpace:
    num_layers: int
    options: tuple[str, ...]
    pinned: dict[int, str] = field(default_factory=dict)
    min_count: dict[str, int] = field(default_factory=dict)
    max_count: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw_space, num_layers: int) -> "SearchSpace":
        """The space of a `space:` settings mapping (options, pinned, min_count, max_count), validated."""
        cfg = dict(raw_space)
        raw = cfg.get("options")
        if isinstance(raw, str) or raw is None:
            raise UserError(f"space.options: {raw!r} is not a list; allowed: a non-empty list of " + ", ".join(OPTIONS))
        options = tuple(raw)
        if not options:
            raise UserError("space.options: empty; allowed: a non-empty list of " + ", ".join(OPTIONS))
        for name in options:
            if name not in OPTIONS:
                raise UserError(f"space.options: unknown option {name!r}; {did_you_mean(name, OPTIONS)}")
        if len(set(options)) != len(options):
            raise UserError(f"space.options: {list(options)} lists an option twice")
        pinned = {}
        for key, option in dict(cfg.get("pinned") or {}).items():
            index = _as_int("space.pinned", key, f"layer index {key!r}")
            if not 0 <= index < num_layers:
                raise UserError(f"space.pinned: layer {index} does not exist; allowed: 0..{num_layers - 1}")
            if option not in OPTIONS:
                raise UserError(f"space.pinned: layer {index} pinned to unknown option {option!r}; {did_you_mean(option, OPTIONS)}")
            pinned[index] = option
        bounds = {}
        for bound in ("min_count", "max_count"):
            bounds[bound] = {}
            for option, count in dict(cfg.get(bound) or {}).items():
                if option not in OPTIONS:
                    raise UserError(f"space.{bound}: unknown option {option!r}; {did_you_mean(option, OPTIONS)}")
                bounds[bound][option] = _as_int(f"space.{bound}", count, f"{option}={count!r}")
        space = cls(num_layers, options, pinned, bounds["min_count"], bounds["max_count"])
        space.check_consistent()
        return space

    def check_consistent(self) -> None:
        """Refuse contradictory constraints before any work is done."""
        for bound in ("min_count", "max_count"):
            for option, count in getattr(self, bound).items():
                if bound == "min_count" and count > 0 and option not in self.options:
                    raise UserError(f"space.min_count: option {option!r} is not in space.options {list(self.options)}")
                if count < 0 or count > self.num_layers:
                    raise UserError(f"space.{bound}: {option}={count} is outside 0..{self.num_layers}")
        pinned_count = {o: sum(1 for p in self.pinned.values() if p == o) for o in OPTIONS}
        for option in OPTIONS:
            low, high = self.min_count.get(option, 0), self.max_count.get(option, self.num_layers)
            if low > high:
                raise UserError(f"space.min_count: {option}={low} exceeds space.max_count {option}={high}")
            if pinned_count[option] > high:
                raise UserError(f"space.pinned: {pinned_count[option]} layers pinned to {option} exceed "
                                f"space.max_count {option}={high}")
        if sum(self.min_count.values()) > self.num_layers:
            raise UserError(f"space.min_count: {dict(self.min_count)} needs {sum(self.min_count.values())} layers, "
                            f"the model has {self.num_layers}")
        # The free (unpinned) layers must be able to make up every minimum at once, and to be filled at all.
        free = self.num_layers - len(self.pinned)
        need = {o: max(0, low - pinned_count[o]) for o, low in self.min_count.items()}
        if sum(need.values()) > free:
            raise UserError(f"space.min_count: {dict(self.min_count)} cannot be met with {len(self.pinned)} of "
                            f"{self.num_layers} layers pinned ({free} free, {sum(need.values())} needed)")
        room = sum(self.max_count.get(o, self.num_layers) - pinned_count[o] for o in self.options)
        if room < free:
            raise UserError(f"space.max_count: {dict(self.max_count)} allows at most {room} of the {free} free layers "
                            f"with space.options {list(self.options)}")

    def free_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.pinned]

    def params_of(self, plan: LayerPlan) -> dict:
        """The trial parameters that produce `plan` (for enqueueing seeds)."""
        return {layer_param(i): plan.layers[i] for i in self.free_layers()}

    def plan_of_params(self, params: dict) -> LayerPlan:
        """The plan an (enqueued or finished) trial's parameters stand for."""
        return LayerPlan(tuple(self.pinned.get(i) or params[layer_param(i)] for i in range(self.num_layers)))

    def violation(self, plan: LayerPlan) -> str | None:
        """Why `plan` is outside the space, or None."""
        if len(plan) != self.num_layers:
            return f"{len(plan)} layers, the model has {self.num_layers}"
        for index, option in enumerate(plan.layers):
            if index in self.pinned and self.pinned[index] != option:
                return f"layer {index} must be {self.pinned[index]}"
            if option not in self.options and index not in self.pinned:
                return f"layer {index} uses {option}, not in {list(self.options)}"
        for option, low in self.min_count.items():
            if plan.count(option) < low:
                return f"{plan.count(option)} {option} layers < min {low}"
        for option, high in self.max_count.items():
            if plan.count(option) > high:
                return f"{plan.count(option)} {option} layers > max {high}"
        return None

    def project(self, plan: LayerPlan) -> LayerPlan:
        """`plan` with pinned layers forced and disallowed options replaced by softmax (by the first allowed
        option when softmax is not allowed); seeds use this. Count bounds are not enforced here."""
        fallback = "softmax" if "softmax" in self.options else self.options[0]
        names = [self.pinned.get(i) or (o if o in self.options else fallback) for i, o in enumerate(plan.layers)]
        return LayerPlan(tuple(names))


def _as_int(field_name: str, value, what: str) -> int:
    if isinstance(value, bool):
        raise UserError(f"{field_name}: {what} is not a whole number")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{field_name}: {what} is not a whole number") from None
    if number != value and str(number) != str(value).strip():
        raise UserError(f"{field_name}: {what} is not a whole number")
    return number
