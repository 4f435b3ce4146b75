"""The config schema: the library's settings dataclasses are the one source of every default.

The base config that every verb composes is built here from those dataclasses' own defaults (plus the few
settings only the application reads, `AppSettings`), and registered with Hydra's ConfigStore as
`base_config`; `conf/config.yaml` lists it first, then one choice per config group. The default choice of a
group is the schema itself (its YAML file holds only a comment, or its node is registered here when the
group's choices do not share fields, as samplers do); other choices override a few fields. So a library
caller who builds `SearchSettings()` runs what `python search.py` runs (tests/unit/test_config_defaults.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from layerboost_core.bench import BenchSettings
from layerboost_core.heal import HealSettings
from layerboost_core.transfer import TransferSettings
from layerboost_core.workbench import DataSettings, ModelSettings, ProxySettings
from layerboost_core.workload import Workload
from layerboost_search.settings import (DEFAULT_SAMPLER, EvalSettings, FidelitySettings, ObjectiveSettings,
                                        RunnerSettings, SearchSettings, SurrogateSettings)

BASE_CONFIG = "base_config"
MODEL_FIELDS = ("name", "source", "fallback_source")  # the `model` group; device and dtype are top-level


@dataclass(frozen=True)
class AppSettings:
    """Settings only the application reads (the library takes their effect as arguments)."""

    dry_run: bool = False  # search: print the memory and time plan from the model's config (no weights) and exit
    # Memory of one device for that plan (None: read from `device`); set it to plan a GPU run from a machine
    # without that GPU, e.g. device=cuda device_memory_gb=80.
    device_memory_gb: float | None = None
    plan: str | None = None  # eval, bench, heal, export: a plan JSON file, a compact string (SSLN...) or a folder
    out: str | None = None  # export: the model folder to write (None: <output_dir>/exported/<plan id>)
    verbose: bool = False  # true: full tracebacks on errors
    heal_out: str | None = None  # heal: the folder to write (None: <output_dir>/healed/<plan id>), key heal.out
    bench_bank: bool = False  # bench: load/train the bank first (speed does not depend on its weights), key bench.bank


def _plain(value):
    """`value` as plain JSON data (tuples become lists), as the composed config holds it."""
    return json.loads(json.dumps(value))


def base_config() -> dict:
    """The whole default config, every value taken from the settings dataclasses' defaults."""
    search, app, model = SearchSettings(), AppSettings(), ModelSettings()
    workbench = search.workbench
    config = {
        "model": {name: getattr(model, name) for name in MODEL_FIELDS},
        "space": search.space,
        "objective": asdict(ObjectiveSettings()),
        "runner": asdict(RunnerSettings()),
        "workload": asdict(Workload()),
        "eval": {k: v for k, v in asdict(EvalSettings()).items() if k != "seed"},  # seed: the top-level one
        "budget": search.budget,
        "study": search.study,
        "storage": search.storage,
        "heartbeat_interval": search.heartbeat_interval,
        "grace_period": search.grace_period,
        "dry_run": app.dry_run,
        "device_memory_gb": app.device_memory_gb,
        "seed": search.seed,
        "plan": app.plan,
        "out": app.out,
        "device": model.device,
        "dtype": model.dtype,
        "verbose": app.verbose,
        "progress": workbench.progress,
        "output_dir": search.output_dir,
        "data": asdict(DataSettings()),  # lengths None: the workload's prefill, decided in WorkbenchSettings
        "proxy": asdict(ProxySettings()),
        "attention": search.workbench.options,
        "surrogate": asdict(SurrogateSettings()),
        "fidelity": asdict(FidelitySettings()),
        "bench": {**{k: v for k, v in asdict(BenchSettings()).items() if k != "seed"}, "bank": app.bench_bank},
        "transfer": {**asdict(TransferSettings()), "rebuild": workbench.rebuild_bank},
        "heal": {**asdict(HealSettings()), "out": app.heal_out},
    }
    return _plain(config)


_registered = False


def register() -> None:
    """Put the schema into Hydra's ConfigStore (once per process): the base config and the default sampler."""
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=BASE_CONFIG, node=base_config())
    store.store(group="sampler", name="tpe", node=_plain(DEFAULT_SAMPLER))
    _registered = True


def registered_choices(group: str) -> list[str]:
    """Choices of a config group that live in the ConfigStore rather than in conf/ (the default sampler)."""
    return ["tpe"] if group == "sampler" else []
