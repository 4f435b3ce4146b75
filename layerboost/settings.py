"""The composed Hydra config turned into the libraries' typed settings, validated at the edge.

Every value is checked against the type its settings class declares (a whole number, a number, true/false,
a list, ...) before any library code runs, so `budget=abc` is one line naming `budget`, not a traceback.
Range checks live in the settings classes themselves (their __post_init__), next to what they protect.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping

from layerboost_core.bench import BenchSettings
from layerboost_core.errors import UserError, did_you_mean
from layerboost_core.heal import HealSettings, LoraSettings
from layerboost_core.transfer import TransferSettings
from layerboost_core.workbench import DataSettings, ModelSettings, ProxySettings, WorkbenchSettings
from layerboost_core.workload import Workload
from layerboost_search.settings import (EvalSettings, FidelitySettings, ObjectiveSettings, RunnerSettings,
                                        SearchSettings, SurrogateSettings)

from .schema import MODEL_FIELDS


def plain(cfg) -> dict:
    """The composed config as plain Python containers (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _describe(kind) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping (key: value)"}.get(kind, getattr(kind, "__name__", str(kind)))


def coerce(kind, value, name: str):
    """`value` as the declared `kind`, or a UserError naming `name`, the value and what is allowed."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            try:
                return coerce(others[0], value, name)
            except UserError:
                raise UserError(f"{name}: {value!r} is not {_describe(others[0])} or null") from None
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{name}: {value!r} is not a list; write it as [a, b, ...]")
        return tuple(coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(kind):
        return build(kind, value, name)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise UserError(f"{name}: {value!r} is not {_describe(kind)}")


def build(cls, raw, prefix: str, ignore: tuple[str, ...] = (), **given):
    """An instance of the settings dataclass `cls` from the config section `raw` (keys not in `cls` but in
    `ignore` are skipped; `given` overrides or supplies fields that are not in the section)."""
    if not isinstance(raw, Mapping):
        raise UserError(f"{prefix}: {raw!r} is not a mapping of settings")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key in ignore:
            continue
        if key not in names:
            raise UserError(f"{prefix}.{key}: unknown setting; {did_you_mean(key, names)}")
        kwargs[key] = coerce(hints[key], value, f"{prefix}.{key}")
    kwargs.update(given)
    return cls(**kwargs)


def workbench_settings(cfg) -> WorkbenchSettings:
    return _workbench(plain(cfg))


def _workbench(c: dict) -> WorkbenchSettings:
    """The workbench settings of the config `c` (lengths left null are derived by WorkbenchSettings itself)."""
    model = {k: v for k, v in c["model"].items() if k in MODEL_FIELDS}
    return WorkbenchSettings(
        model=build(ModelSettings, model, "model", device=coerce(str, c["device"], "device"),
                    dtype=coerce(str, c["dtype"], "dtype")),
        data=build(DataSettings, c["data"], "data"),
        workload=build(Workload, c["workload"], "workload"),
        options=coerce(dict, c["attention"], "attention"),
        proxy=build(ProxySettings, c["proxy"], "proxy"),
        transfer=build(TransferSettings, c["transfer"], "transfer", ignore=("rebuild",)),
        rebuild_bank=coerce(bool, c["transfer"]["rebuild"], "transfer.rebuild"),
        progress=coerce(bool, c["progress"], "progress"))


def search_settings(cfg) -> SearchSettings:
    c = plain(cfg)
    return SearchSettings(
        workbench=_workbench(c),
        space=coerce(dict, c["space"], "space"),
        objective=build(ObjectiveSettings, c["objective"], "objective"),
        sampler=coerce(dict, c.get("sampler") or {}, "sampler"),
        seed=coerce(int, c["seed"], "seed"),
        runner=build(RunnerSettings, c["runner"], "runner"),
        surrogate=build(SurrogateSettings, c["surrogate"], "surrogate"),
        eval=_eval(c),
        fidelity=build(FidelitySettings, c["fidelity"], "fidelity"),
        budget=coerce(int, c["budget"], "budget"),
        study=coerce(str | None, c["study"], "study"),
        storage=coerce(str | None, c["storage"], "storage"),
        output_dir=coerce(str, c["output_dir"], "output_dir"),
        heartbeat_interval=coerce(int, c["heartbeat_interval"], "heartbeat_interval"),
        grace_period=coerce(int, c["grace_period"], "grace_period"))


def eval_settings(cfg) -> EvalSettings:
    return _eval(plain(cfg))


def _eval(c: dict) -> EvalSettings:
    return build(EvalSettings, c["eval"], "eval", seed=coerce(int, c["seed"], "seed"))


def bench_settings(cfg) -> BenchSettings:
    c = plain(cfg)
    return build(BenchSettings, c["bench"], "bench", ignore=("bank",), seed=coerce(int, c["seed"], "seed"))


def heal_settings(cfg) -> HealSettings:
    """`heal:` settings (`heal.seq_len: null` is the train blocks' own length, decided by the heal itself)."""
    section = dict(plain(cfg)["heal"])
    lora = build(LoraSettings, section.pop("lora"), "heal.lora")
    return build(HealSettings, section, "heal", ignore=("out",), lora=lora)


def plan_spec(cfg, what: str) -> str:
    """The `plan=` argument, or a one-line error saying what it may be."""
    if not cfg.plan:
        raise UserError(f"plan: missing; pass plan=<plan.json>, plan=<compact string such as SSLN...>{what}")
    return str(cfg.plan)
