"""The fidelity ladder: rung measurements per block on a tiny model, resumable climbing, per-fidelity report
columns, plans a higher fidelity dominates marked, and best plans picked by the quality a user accepts."""
from __future__ import annotations

import csv
import json
import math
import random

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

from layerboost_core.errors import UserError
from layerboost_core.plan import LayerPlan
from layerboost_core.workload import Workload
from layerboost_search.fidelity import (binomial_interval, bootstrap_interval, climb, dominated_at, faster_than_keepers,
                                        ladder_candidates,
                                        record_rung, rung_scores, screened_pool, spread)
from layerboost_search.objectives import Objective
from layerboost_search.picks import Floors
from layerboost_search.report import write_report
from layerboost_search.settings import FidelitySettings, RungSettings
from layerboost_search.space import layer_param

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVES = [Objective("kl", "minimize", "proxy"), Objective("latency_s", "minimize", "cost-model", "s")]
MODEL = {"name": "tiny-llama", "source": "tiny:llama", "fingerprint": "f00d", "num_layers": 4}
CONTEXT = {"model": MODEL, "settings": {}, "bank_id": None, "workload": {"prefill": 128, "decode": 0, "batch": 1},
           "study": "unit-fidelity", "storage": "sqlite:///unit.db",
           "reference": {"ttft_s": 1.0, "tpot_s": None, "throughput_tok_s": 0.0, "latency_s": 1.0, "concurrency": 1,
                         "kv_bytes": 4000}}
LONG = RungSettings("long")
DISTRIBUTIONS = {layer_param(i): CategoricalDistribution(["softmax", "linear", "none"]) for i in range(4)}


# --- measuring a rung on a tiny model -------------------------------------------------------------------------


SOURCE_WORDS = "river stone quiet market signal winter garden copper lantern harbor meadow engine".split()


@pytest.fixture(scope="module")
def text_source(tmp_path_factory):
    rng = random.Random(0)
    text = tmp_path_factory.mktemp("text") / "docs.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(SOURCE_WORDS) for _ in range(60)) + "." for _ in range(400)))
    return f"text:{text}"


@pytest.fixture(scope="module")
def evaluator(text_source):
    from layerboost_core.workbench import DataSettings, ModelSettings, ProxySettings, WorkbenchSettings
    from layerboost_search.settings import EvaluatorSettings
    from layerboost_search.worker import PlanEvaluator

    bench = WorkbenchSettings(model=ModelSettings(name="tiny", source="tiny:llama", device="cpu", dtype="float32"),
                              data=DataSettings(source=text_source, seq_len=16, blocks={"calibration": 1, "train": 1,
                                                                                        "heldout": 1}),
                              workload=Workload(prefill=96), proxy=ProxySettings(facts=0), progress=False)
    rungs = (RungSettings("long", factor=2, blocks=3, facts=0),
             RungSettings("facts", factor=4, blocks=2, facts=3),
             RungSettings("huge", factor=2, blocks=10**6))
    return PlanEvaluator(EvaluatorSettings(bench, with_bank=False, rungs=rungs))


def test_a_rung_gives_per_block_values_and_their_mean(evaluator):
    original = evaluator.evaluate_at("long|SSSS")
    assert original["per_block"]["kl"] == [0.0, 0.0, 0.0]  # identical logits: exactly zero, on every block
    changed = evaluator.evaluate_at("long|SNNS")
    per_block = changed["per_block"]["kl"]
    assert len(per_block) == 3 and all(v > 0 for v in per_block)
    assert changed["metrics"]["kl"] == pytest.approx(sum(per_block) / 3)  # blocks without facts: equally long
    assert set(changed["per_block"]) == set(changed["metrics"])
    assert evaluator._rungs["long"].blocks.input_ids.shape == (3, 192)  # factor 2 x prefill 96 tokens
    assert evaluator.evaluate_at("long|SSSS")["per_block"]["kl"] == [0.0, 0.0, 0.0]  # the reference is still all-softmax


def test_a_rung_with_facts_gives_retrieval_per_fact_and_the_originals(evaluator):
    result = evaluator.evaluate_at("facts|SNNS")
    assert len(result["per_block"]["kl"]) == 2 and len(result["per_fact"]["retrieval_acc"]) == 6
    assert all(v in (0.0, 1.0) for v in result["per_fact"]["retrieval_acc"])
    assert result["metrics"]["retrieval_nll"] == pytest.approx(sum(result["per_fact"]["retrieval_nll"]) / 6)
    assert len(result["original"]["retrieval_acc"]) == 6


def test_rungs_read_text_the_proxy_and_earlier_rungs_did_not(evaluator, text_source):
    """The proxy's block, then each rung's blocks, are consecutive stretches of one held-out stream."""
    from layerboost_core.data import heldout_sections

    tokenizer = evaluator.bench.loaded.tokenizer
    proxy, long, facts = heldout_sections(tokenizer, text_source, [(1, 96), (3, 192), (2, 384)])
    assert torch.equal(evaluator.proxy.blocks.input_ids, proxy)
    evaluator.evaluate_at("long|SSSS")
    assert torch.equal(evaluator._rungs["long"].blocks.input_ids, long)
    evaluator.evaluate_at("facts|SSSS")
    scored = evaluator._rungs["facts"].blocks
    kept = [row[1:][mask].tolist() for row, mask in zip(scored.input_ids, scored.scored)]
    assert all(text == block[1:1 + len(text)].tolist() for text, block in zip(kept, facts))  # facts' own text


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
    with pytest.raises(UserError, match="^fidelity.pick_rung: 'nope' is not a rung"):
        FidelitySettings(pick_rung="nope")
    assert RungSettings("long", factor=2).seq_len(2048) == 4096


# --- climbing the ladder --------------------------------------------------------------------------------------


def add(study, plan: str, kl: float, latency: float, top1: float):
    layers = LayerPlan.from_string(plan).layers
    study.add_trial(create_trial(
        values=[kl, latency], params={layer_param(i): o for i, o in enumerate(layers)}, distributions=DISTRIBUTIONS,
        user_attrs={"plan": plan, "plan_id": LayerPlan.from_string(plan).id, "label": "sampled", "feasible": True,
                    "proxy:kl": kl, "proxy:top1_agreement": top1, "kv_bytes": 1000 * plan.count("S")},
        constraints={"0": -0.5}))


def measured(kl: list[float], top1: list[float], hits: list[float] | None = None,
             original: list[float] | None = None) -> dict:
    """A rung's result: per-block KL and agreement, and (with `hits`) per-fact retrieval beside the original's."""
    result = {"metrics": {"kl": sum(kl) / len(kl), "top1_agreement": sum(top1) / len(top1)},
              "per_block": {"kl": kl, "top1_agreement": top1}}
    if hits is not None:
        result["metrics"]["retrieval_acc"] = sum(hits) / len(hits)
        result["per_fact"] = {"retrieval_acc": hits}
        result["original"] = {"retrieval_acc": original if original is not None else [1.0] * len(hits)}
    return result


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
    def cost(t):
        return t.values[1]

    picks = ladder_candidates(front, 6, (0.99, 0.95, 0.9), (0.9, 0.8, 0.7), 1.0, cost)
    # all-softmax; keep 99% -> 5, 95% -> 4, 90% -> 3; latency 0.9 -> 4 (taken), 0.8 -> 3 (taken), 0.7 -> 2
    assert [t.number for t in picks] == [6, 5, 4, 3, 2, 0]  # then the spread's first end
    assert [t.number for t in ladder_candidates(front, 2, (0.99,), (), 1.0, cost)] == [6, 5]
    assert len(ladder_candidates(front, 20, (0.99,), (0.5,), 1.0, cost)) == 7  # every plan once, no more
    # below the quality floor of every best file (0.85 here) a plan is never a candidate; all-softmax always is
    assert [t.number for t in ladder_candidates(front, 20, (0.99,), (0.5,), 1.0, cost, floor=0.85)] == [6, 5, 3, 4]


def test_a_speed_target_takes_the_plan_losing_least_retrieval_then_the_most_agreeing():
    def trial(number, agreement, latency, retrieval_nll=None):
        attrs = {"plan": "LLSS", "proxy:top1_agreement": agreement}
        if retrieval_nll is not None:
            attrs["proxy:retrieval_nll"] = retrieval_nll
        t = create_trial(values=[1 - agreement, latency], user_attrs=attrs)
        t.number = number
        return t

    def cost(t):
        return t.values[1]

    loses = [trial(0, 0.91, 0.45, 0.19), trial(1, 0.89, 0.48, 0.06), trial(2, 0.90, 0.60, 0.01)]
    assert [t.number for t in ladder_candidates(loses, 1, (), (0.5,), 1.0, cost)] == [1]  # 2 is over the target
    no_facts = [trial(0, 0.91, 0.45), trial(1, 0.89, 0.48)]
    assert [t.number for t in ladder_candidates(no_facts, 1, (), (0.5,), 1.0, cost)] == [0]


def test_past_the_fastest_keeper_the_plans_losing_least_retrieval_come_first():
    def trial(number, latency, retrieval_nll):
        t = create_trial(values=[0.1, latency], user_attrs={"plan": "LLSS", "proxy:retrieval_nll": retrieval_nll})
        t.number = number
        return t

    def cost(t):
        return t.values[1]

    pool = [trial(0, 0.30, 0.19), trial(1, 0.45, 0.07), trial(2, 0.40, 0.07), trial(3, 0.70, 0.01), trial(4, 0.50, 0.11)]
    assert [t.number for t in faster_than_keepers(pool, 2, 0.6, cost)] == [2, 1]  # 3 is slower than the keeper
    assert [t.number for t in faster_than_keepers(pool, 9, 0.6, cost)] == [2, 1, 4, 0]
    assert faster_than_keepers(pool, 2, 0.3, cost) == []


def test_the_screened_pool_peels_pareto_layers_of_the_plans_that_keep_the_floors():
    def trial(number, kl, cost, keeps=True):
        t = create_trial(values=[kl, cost], user_attrs={"plan": "SSSS", "keeps": keeps})
        t.number = number
        return t
    trials = [trial(0, 0.0, 1.0), trial(1, 0.3, 0.5, keeps=False), trial(2, 0.4, 0.6), trial(3, 0.5, 0.7),
              trial(4, 0.9, 0.4, keeps=False), trial(5, 1.0, 0.45), trial(6, 0.6, 0.8)]
    def keeps(t):
        return t.user_attrs["keeps"]
    def cost(t):
        return t.values[1]
    # the first layer of the plans that keep the floors: 0, 2, 5 (3 is dominated by 2, 6 by 3); 1 and 4 never
    assert [t.number for t in screened_pool(trials, 2, keeps, 1, cost)] == [5, 2, 0]
    # more wanted than the first layer holds: the next layers, every plan sorted fastest first
    assert [t.number for t in screened_pool(trials, 3, keeps, 1, cost)] == [5, 2, 3, 0]
    assert [t.number for t in screened_pool(trials, 9, keeps, 1, cost)] == [5, 2, 3, 6, 0]
    # a maximised quality (an lm-eval task) reverses which plans dominate: 5 then dominates all, 6 dominates 0
    assert [t.number for t in screened_pool(trials, 1, keeps, -1, cost)] == [5, 2, 3, 6]
    assert screened_pool(trials, 4, lambda t: False, 1, cost) == []


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


def test_binomial_interval_is_clopper_pearson():
    lo, hi = binomial_interval(90, 96)
    assert lo == pytest.approx(0.8802, abs=1e-3) and hi == pytest.approx(0.9733, abs=1e-3)
    assert binomial_interval(0, 16)[0] == 0.0 and binomial_interval(16, 16)[1] == 1.0
    assert binomial_interval(16, 16)[0] == pytest.approx(0.05 ** (1 / 16))  # all found: (1 - level) / 2 = 0.05


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
    table = write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",))
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


def test_best_plans_are_picked_at_the_pick_rung_and_unmet_targets_are_said(laddered, tmp_path):
    floors = Floors(agreement=0.8, retrieval_share=None)
    table = write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long", floors=floors)
    best = {p.name: json.loads(p.read_text()) for p in (tmp_path / "best").iterdir()}
    # at `long`: 99% only all-softmax keeps (the original: never offered); 95% and 90% trial 2 (0.96-0.97);
    # latency <= 50%: trial 2 (trial 3 is faster but its agreement, 0.5-0.6, is below the floor: never offered)
    assert "keep-99pct.json" not in best and all(b["plan"] != "SSSS" for b in best.values())
    assert best["keep-95pct.json"]["origin"]["trial"] == 2
    assert best["latency-50pct.json"]["origin"]["trial"] == 2
    assert all(b["origin"]["trial"] != 3 for b in best.values())
    long_kl = best["keep-95pct.json"]["metrics"]["long:kl"]
    assert long_kl["fidelity"] == "long" and long_kl["value"] == pytest.approx(0.6) and long_kl["samples"] == 2
    assert long_kl["interval90"][0] <= 0.6 <= long_kl["interval90"][1]
    assert best["keep-95pct.json"]["floors"]["top1_agreement_low"] == 0.8
    assert "trial 3 (top-1 agreement 0.550 [0.500, 0.600] < 0.8)" in table
    # a stricter floor: only all-softmax keeps it, so nothing is offered, and every target is said
    table = write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                         floors=Floors(agreement=0.97, retrieval_share=None))
    said = ("`latency-50pct`: no plan that keeps the floors runs at <= 50% of all-softmax's request latency; no plan "
            "but the original keeps the floors")
    assert said in table and said in (tmp_path / "summary.md").read_text()
    assert not list((tmp_path / "best").iterdir())


def test_summary_opens_with_the_answer(laddered, tmp_path):
    write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                 floors=Floors(agreement=0.8, retrieval_share=None))
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert lines[0].startswith("# Search") and lines[2] == "## What to ship"
    assert lines[4].startswith("Every best file keeps, at fidelity `long`")
    table = lines[lines.index("| best files | plan | request latency vs all-softmax: measured median [90%] "
                              "| predicted | throughput vs all-softmax | ttft vs all-softmax | tpot vs all-softmax "
                              "| sequences at once (all-softmax) | cache per sequence | KL [90%] | top-1 agreement [90%] "
                              "| retrieval: facts found [90%] | fidelity | other rungs | export |") + 2:]
    assert table[0].startswith("| `keep-95pct.json`, `keep-90pct.json`, ") and "| `SLLN` |" in table[0]
    assert "`layerboost export plan=" in table[0]  # the best file is all the command needs
    assert lines.index("## What to ship") < lines.index("## Pareto front (proxy)")


def test_answer_json_holds_the_answer_and_the_fastest_plan_keeping_the_floors(laddered, tmp_path):
    write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                 floors=Floors(agreement=0.8, retrieval_share=None))
    answer = json.loads((tmp_path / "answer.json").read_text())
    best = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "best").iterdir()}
    assert answer["schema"] == "layerboost.answer/v2" and answer["floors"]["top1_agreement"] == 0.8
    assert answer["speed"]["metric"] == "latency"
    assert set(answer["best"]) == set(best)  # one entry per best file, naming the same trial
    assert all(answer["best"][name]["trial"] == best[name]["origin"]["trial"] for name in best)
    assert answer["fastest_keeping_floors"]["trial"] == 2 and answer["below_floors"]["3"].startswith("top-1 agreement")
    assert answer["best"]["keep-95pct"]["top1_agreement"]["n"] == 2
    assert any(line.startswith("`keep-99pct`") for line in answer["unmet"])
    # floors only the original keeps: no plan offered, none keeping the floors, every target unmet
    write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                 floors=Floors(agreement=0.97, retrieval_share=None))
    answer = json.loads((tmp_path / "answer.json").read_text())
    assert answer["best"] == {} and answer["fastest_keeping_floors"] is None and len(answer["unmet"]) == 8


def test_a_file_of_an_earlier_report_for_a_plan_below_the_floors_is_removed(laddered, tmp_path):
    write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                 floors=Floors(agreement=0.8, retrieval_share=None))
    assert json.loads((tmp_path / "best" / "latency-50pct.json").read_text())["origin"]["trial"] == 2
    write_report(laddered, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                 floors=Floors(agreement=0.97, retrieval_share=None))  # trial 2 (0.96-0.97) no longer keeps it
    assert not (tmp_path / "best" / "latency-50pct.json").exists()


def test_a_quality_bar_no_plan_meets_is_said_not_written(tmp_path):
    study = optuna.create_study(study_name="unit-fidelity", directions=["minimize", "minimize"])
    add(study, "SLLN", 0.5, 0.4, 0.95)
    add(study, "LLNN", 2.0, 0.2, 0.8)
    record_rung(study, LONG, 0, measured([0.9], [0.46]))
    record_rung(study, LONG, 1, measured([2.0], [0.3]))
    table = write_report(study, OBJECTIVES, tmp_path, CONTEXT, rungs=("long",), pick_rung="long",
                         floors=Floors(agreement=0.0, retrieval_share=None))
    assert not [p for p in (tmp_path / "best").iterdir() if p.name.startswith("keep-")]
    assert ("`keep-99pct`: no plan but the original keeps 99% top-1 agreement at the low end of its interval with "
            "the floors kept" in table)
    assert "0.460 (n=1)" in table  # one block: no interval to give, said so
    assert math.isclose(float(read_csv(tmp_path / "trials.csv")[0]["long:top1_agreement"]), 0.46)
