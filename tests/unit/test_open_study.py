"""Opening a study: drivers started together on a new sqlite database race to create its tables."""
from __future__ import annotations

import multiprocessing

import optuna
import pytest
import sqlalchemy.exc

from layerboost_search.study import open_study
from layerboost_search.objectives import Objective

OBJECTIVES = [Objective("kl", "minimize", "proxy"), Objective("latency_s", "minimize", "cost-model", "s")]


def test_a_driver_that_loses_the_schema_race_retries(monkeypatch, tmp_path):
    real, calls = optuna.storages.RDBStorage, []

    class Racing(real):
        def __init__(self, url, **kwargs):
            calls.append(url)
            if len(calls) == 1:  # what sqlite says when another process created the tables first
                raise sqlalchemy.exc.OperationalError("CREATE TABLE trials", {}, Exception("table trials already exists"))
            super().__init__(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = open_study(url, "race", OBJECTIVES, optuna.samplers.RandomSampler(), 10, 30)
    assert len(calls) == 2 and study.study_name == "race"


def test_other_storage_errors_are_one_clear_line(tmp_path):
    from layerboost_core.errors import UserError

    with pytest.raises(UserError, match="storage: cannot open"):
        open_study(f"sqlite:///{tmp_path}/no/such/folder/x.db", "x", OBJECTIVES, None, 10, 30)


def _open(args):
    url, barrier = args
    barrier.wait()
    open_study(url, "together", OBJECTIVES, optuna.samplers.RandomSampler(), 10, 30)
    return True


def test_drivers_opening_a_new_database_at_once_all_succeed(tmp_path):
    url = f"sqlite:///{tmp_path / 'together.db'}"
    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(4)
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            assert pool.map(_open, [(url, barrier)] * 4) == [True] * 4
