"""Reports of a study: hypervolume, knee of the front, and every report file written from an in-memory study."""
from __future__ import annotations

import csv
import json

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from layerboost_core.pareto import hypervolume_2d
from layerboost_core.plan import PLAN_SCHEMA, LayerPlan
from layerboost_search.objectives import Objective
from layerboost_search.report import knee, write_report
from layerboost_search.space import layer_param

optuna.logging.set_verbosity(optuna.logging.WARNING)

OBJECTIVES = [Objective("kl", "minimize", "proxy"), Objective("latency_s", "minimize", "cost-model", "s")]
MODEL = {"name": "tiny-llama", "source": "tiny:llama", "fingerprint": "f00d", "num_layers": 4}


# --- hypervolume ----------------------------------------------------------------------------------------------


def test_hypervolume_of_one_point_is_its_box():
    assert hypervolume_2d([(1.0, 1.0)], (3.0, 3.0)) == pytest.approx(4.0)


def test_hypervolume_of_two_points_counts_the_overlap_once():
    # boxes [1,3]x[2,3] (area 2) and [2,3]x[1,3] (area 2) overlap in [2,3]x[2,3] (area 1)
    assert hypervolume_2d([(1.0, 2.0), (2.0, 1.0)], (3.0, 3.0)) == pytest.approx(3.0)
    assert hypervolume_2d([(2.0, 1.0), (1.0, 2.0)], (3.0, 3.0)) == pytest.approx(3.0)  # order does not matter


def test_dominated_and_duplicate_points_add_nothing():
    front = [(1.0, 2.0), (2.0, 1.0)]
    assert hypervolume_2d(front + [(2.5, 2.5), (1.0, 2.0), (2.0, 1.0)], (3.0, 3.0)) == pytest.approx(3.0)


def test_points_outside_the_reference_box_add_nothing():
    assert hypervolume_2d([(4.0, 0.0), (0.0, 3.0), (3.0, 1.0)], (3.0, 3.0)) == 0.0
    assert hypervolume_2d([(4.0, 0.0), (1.0, 1.0)], (3.0, 3.0)) == pytest.approx(4.0)


def test_hypervolume_of_nothing_is_zero():
    assert hypervolume_2d([], (1.0, 1.0)) == 0.0


def test_hypervolume_of_a_staircase():
    # three steps: x in [0,1) best y 3, [1,2) best 2, [2,4) best 1; reference y 4
    points = [(0.0, 3.0), (1.0, 2.0), (2.0, 1.0)]
    assert hypervolume_2d(points, (4.0, 4.0)) == pytest.approx(1 * 1 + 1 * 2 + 2 * 3)


# --- knee -----------------------------------------------------------------------------------------------------


def frozen(number: int, quality: float, latency: float):
    trial = create_trial(values=[quality, latency])
    trial.number = number
    return trial


def test_knee_is_the_point_farthest_from_the_line_between_the_extremes():
    front = [frozen(0, 1.0, 0.0), frozen(1, 0.1, 0.1), frozen(2, 0.05, 0.5), frozen(3, 0.0, 1.0)]
    assert knee(front, OBJECTIVES).number == 1


def test_knee_with_a_maximised_quality():
    objectives = [Objective("accuracy", "maximize", "lm-eval"), OBJECTIVES[1]]
    front = [frozen(0, 0.2, 0.0), frozen(1, 0.85, 0.2), frozen(2, 0.9, 1.0)]
    assert knee(front, objectives).number == 1


def test_knee_of_a_short_front_is_its_first_point():
    assert knee([], OBJECTIVES) is None
    assert knee([frozen(5, 0.0, 1.0)], OBJECTIVES).number == 5
    assert knee([frozen(5, 0.0, 1.0), frozen(6, 1.0, 0.0)], OBJECTIVES).number == 5


# --- write_report ---------------------------------------------------------------------------------------------

DISTRIBUTIONS = {layer_param(i): CategoricalDistribution(["softmax", "linear", "none"]) for i in range(4)}


def add(study, plan: str, label: str, kl: float, latency: float, feasible: bool = True):
    layers = LayerPlan.from_string(plan).layers
    study.add_trial(create_trial(
        values=[kl, latency], params={layer_param(i): o for i, o in enumerate(layers)}, distributions=DISTRIBUTIONS,
        user_attrs={"plan": plan, "plan_id": LayerPlan.from_string(plan).id, "label": label, "feasible": feasible,
                    "proxy:kl": kl, "proxy:top1_agreement": 1.0 - kl / 10, "kv_bytes": 1000 * plan.count("S")},
        constraints={"0": -0.5 if feasible else 0.5}))


@pytest.fixture
def study():
    study = optuna.create_study(study_name="unit-report", directions=["minimize", "minimize"])
    add(study, "SSSS", "all-softmax", 0.0, 1.0)                 # 0: front
    add(study, "SSLN", "heuristic(none=1,linear=1)", 0.3, 0.55)  # 1: front
    add(study, "SLLN", "sampled", 0.5, 0.4)                    # 2: front (knee)
    add(study, "LLNN", "interleaved(softmax every 2, else none)", 2.0, 0.2)  # 3: front
    add(study, "SSSL", "sampled", 0.4, 0.9)                    # 4: dominated by 1
    add(study, "NNNN", "sampled", 5.0, 0.05, feasible=False)   # 5: would be on the front, but infeasible
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"plan": "LNLN", "label": "sampled",
                                                                      "fail_reason": "non-finite metrics: kl"}))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"plan": "SSSS", "label": "sampled",
                                                                        "skipped": "duplicate of trial 0"}))
    return study


CONTEXT = {"model": MODEL, "settings": {"linear": {"window": 4, "feature_dim": 8, "sinks": 2}}, "bank_id": "bank123",
           "workload": {"prefill": 128, "decode": 0, "batch": 1}, "study": "unit-report",
           "storage": "sqlite:///unit.db",
           "reference": {"ttft_s": 1.0, "tpot_s": None, "throughput_tok_s": 0.0, "latency_s": 1.0, "concurrency": 1,
                         "kv_bytes": 4000}}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_write_report_writes_every_file(study, tmp_path):
    run_dir = tmp_path / "runs" / "unit-report"
    table = write_report(study, OBJECTIVES, run_dir, CONTEXT)
    assert sorted(p.name for p in run_dir.iterdir()) == ["answer.json", "best", "pareto.csv", "pareto.html", "summary.md",
                                                         "trials.csv"]

    trials = read_csv(run_dir / "trials.csv")
    assert [int(r["number"]) for r in trials] == list(range(8))
    assert [r["state"] for r in trials] == ["COMPLETE"] * 6 + ["FAIL", "PRUNED"]
    assert trials[6]["fail_reason"] == "non-finite metrics: kl"
    assert trials[7]["skipped"] == "duplicate of trial 0"
    assert float(trials[2]["kl"]) == 0.5 and float(trials[2]["latency_s"]) == 0.4

    pareto = read_csv(run_dir / "pareto.csv")
    assert sorted(int(r["number"]) for r in pareto) == [0, 1, 2, 3]  # not the dominated 4, not the infeasible 5

    html = (run_dir / "pareto.html").read_text()
    assert "plotly" in html.lower() and "Pareto front" in html and "paper heuristic" in html

    best = {p.name: json.loads(p.read_text()) for p in (run_dir / "best").iterdir()}
    # latency 90% to 60%: the best KL at latency <= 0.6 is trial 1; 50%: trial 2; knee: trial 2. No rung measured,
    # so everything reads the proxy (intervals n=1) and quality bars its top-1 agreement (1 - kl / 10): 99% only
    # all-softmax (trial 0: the original, never offered) keeps; 95% and 90%: trial 2 (0.95) is the fastest
    assert sorted(best) == ["fastest.json", "keep-90pct.json", "keep-95pct.json", "knee.json",
                            *(f"latency-{p}pct.json" for p in (50, 60, 70, 80, 90))]
    # fastest: trial 3 (agreement 0.8, right at the floor) keeps the floors and reaches no bar; it is still offered
    assert best["fastest.json"]["origin"]["trial"] == 3
    assert [best[f"keep-{p}pct.json"]["origin"]["trial"] for p in (95, 90)] == [2, 2]
    assert [best[f"latency-{p}pct.json"]["origin"]["trial"] for p in (90, 80, 70, 60)] == [1, 1, 1, 1]
    assert best["latency-50pct.json"]["origin"]["trial"] == 2
    assert best["knee.json"]["origin"]["trial"] == 2
    for data in best.values():
        assert data["schema"] == PLAN_SCHEMA
        plan = LayerPlan.from_json(data, MODEL)  # loads back for the same model
        assert data["plan"] == str(plan) and data["num_layers"] == 4
        assert data["model"]["fingerprint"] == "f00d" and data["bank_id"] == "bank123"
        assert data["metrics"]["kl"]["fidelity"] == "proxy"
        assert data["metrics"]["latency_s"]["fidelity"] == "cost-model"
        assert data["origin"]["study"] == "unit-report"
    assert best["knee.json"]["plan"] == "SLLN"

    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# Search unit-report")
    assert "optuna-dashboard sqlite:///unit.db" in summary
    assert "complete 6" in summary and "fail 1" in summary and "pruned 1" in summary
    assert "`keep-99pct`: no plan but the original keeps 99%" in summary
    assert "`latency-50pct.json`, `knee.json` | `SLLN` |" in summary
    assert "Every best file keeps, at fidelity `proxy`" in table and "0.9500 (n=1)" not in table
    assert "| 0.950 (n=1) |" in table  # the proxy's one block: said, not given an interval
    for plan in ("SSSS", "SSLN", "SLLN", "LLNN"):
        assert f"`{plan}`" in table
    assert "`NNNN`" not in table and "`SSSL`" not in table


def test_write_report_is_repeatable(study, tmp_path):
    run_dir = tmp_path / "run"
    write_report(study, OBJECTIVES, run_dir, CONTEXT)
    first = (run_dir / "trials.csv").read_text()
    write_report(study, OBJECTIVES, run_dir, CONTEXT)
    assert (run_dir / "trials.csv").read_text() == first
    assert not [p for p in run_dir.rglob(".*")]  # no temporary files left behind


def test_lm_eval_scores_of_finished_trials_reach_the_report(tmp_path):
    # Optuna refuses to change a finished trial (in RDB storage); lm-eval scores come after the trial.
    from layerboost_search.study import lm_eval_scores, record_lm_eval

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="unit-report", storage=storage, directions=["minimize", "minimize"])
    add(study, "SSSS", "all-softmax", 0.0, 1.0)
    add(study, "SLLN", "sampled", 0.5, 0.4)
    record_lm_eval(study, 1, {"lb_passkey": 0.75, "lb_cloze": 0.5})
    reopened = optuna.load_study(study_name="unit-report", storage=storage)
    assert lm_eval_scores(reopened) == {1: {"lb_passkey": 0.75, "lb_cloze": 0.5}}

    run_dir = tmp_path / "run"
    table = write_report(reopened, OBJECTIVES, run_dir, CONTEXT)
    trials = read_csv(run_dir / "trials.csv")
    assert float(trials[1]["lm_eval:lb_passkey"]) == 0.75 and trials[0]["lm_eval:lb_passkey"] == ""
    best = json.loads((run_dir / "best" / "latency-50pct.json").read_text())
    assert best["metrics"]["lm_eval:lb_passkey"] == {"value": 0.75, "fidelity": "lm-eval"}
    assert "lm_eval:lb_passkey" in table and "0.750" in table


def test_report_shows_which_layers_were_local_or_global_in_the_original(study, tmp_path):
    # A Gemma-3-like original: layers 0, 1, 3 slide over a window, layer 2 is global.
    context = {**CONTEXT, "layer_kinds": ["local:512", "local:512", "global", "local:512"]}
    run_dir = tmp_path / "run"
    table = write_report(study, OBJECTIVES, run_dir, context)
    assert "| | original (G global, w sliding window) | `wwGw` |" in table
    assert "original attention per layer: `wwGw`" in (run_dir / "summary.md").read_text()
    trials = {r["plan"]: r for r in read_csv(run_dir / "trials.csv")}
    assert (trials["SSLN"]["softmax_global"], trials["SSLN"]["softmax_local"]) == ("0/1", "2/3")
    assert (trials["SSSL"]["softmax_global"], trials["SSSL"]["softmax_local"]) == ("1/1", "2/3")


def test_report_of_an_all_global_model_adds_no_layer_kind_columns(study, tmp_path):
    run_dir = tmp_path / "run"
    table = write_report(study, OBJECTIVES, run_dir, {**CONTEXT, "layer_kinds": ["global"] * 4})
    assert "original (G global" not in table
    assert "softmax_global" not in read_csv(run_dir / "trials.csv")[0]
