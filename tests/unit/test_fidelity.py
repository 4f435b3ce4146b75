"""The fidelity ladder: rung measurements per block on a tiny model, resumable climbing, per-fidelity report
columns, plans a higher fidelity dominates marked, and best plans picked by the quality a user accepts."""
from __future__ import annotations

import csv
import json
import math
import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from layerboost_core.errors import UserError
from layerboost_core.plan import LayerPlan
from layerboost_core.workload import Workload
from layerboost_search.fidelity import (bootstrap_interval, climb, dominated_at, fastest_keeping, ladder_candidates,
                                        record_rung, rung_scores, spread)
from layerboost_search.objectives import Objective
from layerboost_search.report import write_report
from layerboost_search.settings import RungSettings
from layerboost_search.space import layer_param

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVES = [Objective("kl", "minimize", "proxy"), Objective("latency_s", "minimize", "cost-model", "s")]
MODEL = {"name": "tiny-llama", "source": "tiny:llama", "fingerprint": "f00d", "num_layers": 4}
CONTEXT = {"model": MODEL, "settings": {}, "bank_id": None, "workload": {"prefill": 128, "decode": 0, "batch": 1},
           "study": "unit-fidelity", "storage": "sqlite:///unit.db", "softmax_latency": 1.0}
LONG = RungSettings("long")
DISTRIBUTIONS = {layer_param(i): CategoricalDistribution(["softmax", "linear", "none"]) for i in range(4)}


# --- measuring a rung on a tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    from layerboost_core.workbench import DataSettings, ModelSettings, WorkbenchSettings
    from layerboost_search.settings import EvaluatorSettings
    from layerboost_search.worker import PlanEvaluator

    words = "river stone quiet market signal winter garden copper lantern harbor meadow engine".split()
    rng = random.Random(0)
    text = tmp_path_factory.mktemp("text") / "docs.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) for _ in range(120)))
    source = f"text:{text}"
    bench = WorkbenchSettings(model=ModelSettings(name="tiny", source="tiny:llama", device="cpu", dtype="float32"),
                              data=DataSettings(source=source, seq_len=16, blocks={"calibration": 1, "train": 1,
                                                                                   "heldout": 1}),
                              workload=Workload(prefill=16), progress=False)
    rungs = (RungSettings("long", factor=2, blocks=3, source=source),
             RungSettings("huge", factor=2, blocks=10**6, source=source),
             RungSettings("needles", factor=4, blocks=1, source=source, needles=2),
             RungSettings("own", factor=2, blocks=3))  # no source: the search's data.source
    return PlanEvaluator(EvaluatorSettings(bench, with_bank=False, rungs=rungs))


def test_a_rung_gives_per_block_values_and_their_mean(evaluator):
    original = evaluator.evaluate_at("long|SSSS")
    assert original["per_block"]["kl"] == [0.0, 0.0, 0.0]  # identical logits: exactly zero, on every block
    changed = evaluator.evaluate_at("long|SNNS")
    per_block = changed["per_block"]["kl"]
    assert len(per_block) == 3 and all(v > 0 for v in per_block)
    assert changed["metrics"]["kl"] == pytest.approx(sum(per_block) / 3)
    assert set(changed["per_block"]) == set(changed["metrics"])
    assert evaluator._rungs["long"].evaluators[0][0].blocks.shape == (1, 32)  # factor 2 x prefill 16 tokens
    assert evaluator.evaluate_at("long|SSSS")["per_block"]["kl"] == [0.0, 0.0, 0.0]  # the reference is still all-softmax


def test_a_rung_without_a_source_reads_the_searchs_own_data(evaluator):
    assert evaluator.evaluate_at("own|SNNS")["per_block"] == evaluator.evaluate_at("long|SNNS")["per_block"]


def test_a_rung_with_needles_gives_retrieval_per_row(evaluator):
    result = evaluator.evaluate_at("needles|SNNS")
    assert len(result["per_block"]["kl"]) == 1 and len(result["per_block"]["retrieval_acc"]) == 2
    assert all(0.0 <= v <= 1.0 for v in result["per_block"]["retrieval_acc"])
    assert result["metrics"]["retrieval_nll"] == pytest.approx(sum(result["per_block"]["retrieval_nll"]) / 2)


def test_a_rung_asking_for_more_text_than_there_is_is_refused(evaluator):
    with pytest.raises(UserError, match="fidelity.rungs: rung 'huge' asks for 1000000 block"):
        evaluator.evaluate_at("huge|SSSS")
    with pytest.raises(KeyError, match="no fidelity rung 'nope'"):
        evaluator.evaluate_at("nope|SSSS")


def test_rung_settings_refuse_bad_values():
    with pytest.raises(UserError, match="fidelity.rungs\\[long\\].blocks"):
        RungSettings("long", blocks=0)
    with pytest.raises(UserError, match="not 'proxy'"):
        RungSettings("proxy")
    assert RungSettings("long", factor=2).seq_len(2048) == 4096


# --- climbing the ladder --------------------------------------------------------------------------------------


def add(study, plan: str, kl: float, latency: float, top1: float):
    layers = LayerPlan.from_string(plan).layers
    study.add_trial(create_trial(
        values=[kl, latency], params={layer_param(i): o for i, o in enumerate(layers)}, distributions=DISTRIBUTIONS,
        user_attrs={"plan": plan, "plan_id": LayerPlan.from_string(plan).id, "label": "sampled", "feasible": True,
                    "proxy:kl": kl, "proxy:top1_agreement": top1, "kv_bytes": 1000 * plan.count("S")},
        constraints={"0": -0.5}))


def measured(kl: list[float], top1: list[float]) -> dict:
    return {"metrics": {"kl": sum(kl) / len(kl), "top1_agreement": sum(top1) / len(top1)},
            "per_block": {"kl": kl, "top1_agreement": top1}}


class FakeRunner:
    """Answers `evaluate_at` jobs from a table and records what was submitted."""

    def __init__(self, answers: dict):
        self.answers, self.submitted, self.queue = answers, [], []

    def submit(self, key, method, text):
        self.submitted.append((method, text))
        self.queue.append(key)

    def next_result(self):
        key = self.queue.pop(0)
        return key, self.answers[key]


def test_climb_measures_only_what_the_study_lacks(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="unit-fidelity", storage=storage, directions=["minimize", "minimize"])
    add(study, "SSSS", 0.0, 1.0, 1.0)
    add(study, "SSLN", 0.3, 0.55, 0.97)
    long = RungSettings("long")
    record_rung(study, long, 0, measured([0.0], [1.0]))
    runner = FakeRunner({(long, 1): measured([0.5, 0.7], [0.9, 0.8]), (long, 0): {"error": "must not run"}})
    climb(study, runner, study.best_trials, [long], lambda t: t.user_attrs["plan"], progress=False)
    assert runner.submitted == [("evaluate_at", "long|SSLN")]
    reopened = optuna.load_study(study_name="unit-fidelity", storage=storage)
    assert rung_scores(reopened)["long"][1]["per_block"]["kl"] == [0.5, 0.7]

    longer = RungSettings("long", blocks=4)  # the same name, other settings: measured again
    runner = FakeRunner({(longer, 0): measured([0.0] * 4, [1.0] * 4), (longer, 1): measured([0.6] * 4, [0.9] * 4)})
    climb(reopened, runner, reopened.best_trials, [longer], lambda t: t.user_attrs["plan"], progress=False)
    assert len(runner.submitted) == 2 and rung_scores(reopened)["long"][1]["per_block"]["kl"] == [0.6] * 4


def test_spread_keeps_the_ends_of_the_front():
    assert spread(list(range(10)), 3) == [0, 4, 9]  # round(4.5) is 4 (banker's rounding)
    assert spread([1, 2], 6) == [1, 2]


def test_ladder_candidates_are_the_plans_a_best_plan_file_can_name():
    def trial(number, plan, agreement, latency):
        t = create_trial(values=[1 - agreement, latency], user_attrs={"plan": plan, "proxy:top1_agreement": agreement})
        t.number = number
        return t
    # latency-sorted front, fastest first; all-softmax at 1.0 s
    front = [trial(0, "NNNN", 0.10, 0.20), trial(1, "LNNN", 0.50, 0.40), trial(2, "LLNS", 0.80, 0.60),
             trial(3, "LLSS", 0.91, 0.75), trial(4, "LSSS", 0.96, 0.85), trial(5, "SSSL", 0.995, 0.95),
             trial(6, "SSSS", 1.0, 1.0)]
    picks = ladder_candidates(front, 6, (0.99, 0.95, 0.9), (0.9, 0.8, 0.7), softmax_latency=1.0)
    # all-softmax; keep 99% -> 5, 95% -> 4, 90% -> 3; latency 0.9 -> 4 (taken), 0.8 -> 3 (taken), 0.7 -> 2
    assert [t.number for t in picks] == [6, 5, 4, 3, 2, 0]  # then the spread's first end
    assert [t.number for t in ladder_candidates(front, 2, (0.99,), (), 1.0)] == [6, 5]
    assert len(ladder_candidates(front, 20, (0.99,), (0.5,), 1.0)) == 7  # every plan once, no more


# --- reading the ladder ---------------------------------------------------------------------------------------


def test_dominated_at_names_the_highest_fidelity_that_dominates():
    points = {"long": {1: (0.9, 0.55), 2: (0.6, 0.4), 3: (0.1, 0.9)},
              "longer": {1: (0.8, 0.55), 2: (0.7, 0.4), 3: (0.9, 0.9)}}
    assert dominated_at(points, ["long", "longer"]) == {1: "longer", 3: "longer"}
    assert dominated_at(points, ["long"]) == {1: "long"}


def test_bootstrap_interval_brackets_the_mean():
    lo, hi = bootstrap_interval([0.1, 0.2, 0.3, 0.9])
    assert lo < 0.375 < hi and 0.1 <= lo and hi <= 0.9
    assert bootstrap_interval([0.4]) == (0.4, 0.4)


def test_fastest_keeping_picks_the_fastest_plan_over_the_bar_or_none():
    candidates = {1: ({"top1_agreement": 0.97}, 0.5), 2: ({"top1_agreement": 0.995}, 0.6),
                  3: ({"kl": 0.005}, 0.7), 4: ({"top1_agreement": 0.5}, 0.1)}
    assert fastest_keeping(candidates, 0.99) == 2
    assert fastest_keeping(candidates, 0.95) == 1
    assert fastest_keeping({3: ({"kl": 0.005}, 0.7)}, 0.99) == 3  # exp(-KL) when agreement was not measured
    assert fastest_keeping(candidates, 0.999) is None


def read_csv(path):
    with open(path, newline="") as handle:
        return {int(r["number"]): r for r in csv.DictReader(handle)}


@pytest.fixture
def laddered():
    study = optuna.create_study(study_name="unit-fidelity", directions=["minimize", "minimize"])
    add(study, "SSSS", 0.0, 1.0, 1.0)     # 0
    add(study, "SSLN", 0.3, 0.55, 0.97)   # 1: on the proxy front; at `long` worse than trial 2, which is faster
    add(study, "SLLN", 0.5, 0.4, 0.95)    # 2
    add(study, "LLNN", 2.0, 0.2, 0.8)     # 3
    record_rung(study, LONG, 0, measured([0.0, 0.0], [1.0, 1.0]))
    record_rung(study, LONG, 1, measured([0.8, 1.0], [0.8, 0.9]))
    record_rung(study, LONG, 2, measured([0.5, 0.7], [0.96, 0.97]))
    record_rung(study, LONG, 3, measured([2.0, 3.0], [0.5, 0.6]))
    return study


def test_report_carries_one_column_set_per_fidelity_and_marks_dominated_plans(laddered, tmp_path):
    table = write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, (0.5,), rungs=("long",))
    for name in ("trials.csv", "pareto.csv"):
        rows = read_csv(tmp_path / name)
        assert float(rows[1]["kl"]) == 0.3 and float(rows[1]["proxy:kl"]) == 0.3  # the proxy, untouched
        assert float(rows[1]["long:kl"]) == pytest.approx(0.9)
        assert float(rows[1]["long:kl_lo"]) <= 0.9 <= float(rows[1]["long:kl_hi"])
        assert float(rows[2]["long:top1_agreement"]) == pytest.approx(0.965)
        assert {n: r["dominated_at"] for n, r in rows.items()} == {0: "", 1: "long", 2: "", 3: ""}
    assert "re-measured at long" in (tmp_path / "pareto.html").read_text()
    assert "dominated at a higher fidelity: 1 (at long)" in (tmp_path / "summary.md").read_text()
    assert "| long |" in table  # the dominated_at cell of trial 1


def test_best_plans_are_picked_at_the_highest_fidelity_and_unmet_targets_are_said(laddered, tmp_path):
    table = write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, (0.5, 0.1), rungs=("long",))
    best = {p.name: json.loads(p.read_text()) for p in (tmp_path / "best").iterdir()}
    # at `long`: 99% only all-softmax keeps; 95% trial 2 (0.965); latency <= 50%: trial 2 (the only one of
    # trials 2, 3 under it with the lower KL); proxy top-1 agreement would have picked the same for 95%, but
    # the numbers in the files are the rung's
    assert best["keep-99pct.json"]["origin"]["trial"] == 0
    assert best["keep-95pct.json"]["origin"]["trial"] == 2
    assert best["latency-50pct.json"]["origin"]["trial"] == 2
    assert "latency-10pct.json" not in best
    long_kl = best["keep-95pct.json"]["metrics"]["long:kl"]
    assert long_kl["fidelity"] == "long" and long_kl["value"] == pytest.approx(0.6) and long_kl["samples"] == 2
    assert long_kl["interval90"][0] <= 0.6 <= long_kl["interval90"][1]
    said = "`latency-10pct`: no plan measured at fidelity `long` is predicted at <= 10% of all-softmax latency"
    assert said in table and said in (tmp_path / "summary.md").read_text()
    assert "picked at fidelity `long`" in table


def test_a_quality_bar_no_plan_meets_is_said_not_written(tmp_path):
    study = optuna.create_study(study_name="unit-fidelity", directions=["minimize", "minimize"])
    add(study, "SLLN", 0.5, 0.4, 0.95)
    add(study, "LLNN", 2.0, 0.2, 0.8)
    record_rung(study, LONG, 0, measured([0.9], [0.46]))
    record_rung(study, LONG, 1, measured([2.0], [0.3]))
    table = write_report(study, OBJECTIVES, tmp_path, CONTEXT, (), rungs=("long",))
    assert not [p for p in (tmp_path / "best").iterdir() if p.name.startswith("keep-")]
    assert ("`keep-99pct`: no plan measured at fidelity `long` keeps 99% of the original's top-1 agreement "
            "(the most kept: 0.460, trial 0)") in table
    assert math.isclose(float(read_csv(tmp_path / "trials.csv")[0]["long:top1_agreement"]), 0.46)
