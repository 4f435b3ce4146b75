"""One source for every default: the CLI's composed default config gives exactly the library's default settings,
so a library caller who builds `SearchSettings()` runs what `python search.py` runs."""
from __future__ import annotations

import dataclasses

import pytest

from layerboost.config import compose
from layerboost.settings import bench_settings, heal_settings, search_settings, workbench_settings
from layerboost_core.bench import BenchSettings
from layerboost_core.heal import HealSettings
from layerboost_core.workbench import DataSettings, WorkbenchSettings
from layerboost_core.workload import Workload
from layerboost_search.settings import SearchSettings


def test_default_library_settings_equal_the_clis():
    cli = search_settings(compose([]))
    library = SearchSettings()
    for field in dataclasses.fields(SearchSettings):
        assert getattr(cli, field.name) == getattr(library, field.name), field.name
    assert cli == library


@pytest.mark.parametrize("verb_settings, library", [(heal_settings, HealSettings()), (bench_settings, BenchSettings()),
                                                    (workbench_settings, WorkbenchSettings())])
def test_each_verbs_defaults_equal_the_librarys(verb_settings, library):
    assert verb_settings(compose([])) == library


def test_lengths_follow_the_workload_in_both_paths():
    """`data.seq_len: null` is the workload's prefill, decided once (WorkbenchSettings), whichever way the
    settings are built."""
    cli = search_settings(compose(["workload.prefill=4096"]))
    library = SearchSettings(workbench=WorkbenchSettings(workload=Workload(prefill=4096)))
    assert cli == library
    assert cli.workbench.data.seq_len == cli.workbench.data.heldout_seq_len == 4096
    explicit = WorkbenchSettings(data=DataSettings(seq_len=512), workload=Workload(prefill=4096))
    assert (explicit.data.seq_len, explicit.data.heldout_seq_len) == (512, 4096)


def test_group_choices_override_only_what_they_name():
    serial = search_settings(compose(["runner=serial", "objective=proxy-memory", "space=no-none", "sampler=nsga2"]))
    default = SearchSettings()
    assert serial.runner.kind == "serial" and serial.objective.memory
    assert serial.space["options"] == ["softmax", "linear"] and serial.space["pinned"] == {}
    assert serial.objective.quality == default.objective.quality
    assert serial.sampler["_target_"] == "optuna.samplers.NSGAIISampler"
    assert type(serial.build_sampler()).__name__ == "NSGAIISampler"
