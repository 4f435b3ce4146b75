"""The search space (validation with messages naming the field, suggest / params_of / violation / project)
and the seed plans (the paper's threshold heuristic, interleavings, enqueued once per study)."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from layerboost_core.errors import UserError
from layerboost_core.plan import LayerPlan
from layerboost_search.driver import enqueue_seeds
from layerboost_search.study import LABEL_ATTR
from layerboost_search.seeds import heuristic_plan, heuristic_sweep, interleaved_plans, retrieval_ranked_plans, seed_plans
from layerboost_core.space import SearchSpace, layer_param
from layerboost_search.space import distributions, suggest

ALL = ["softmax", "linear", "none"]

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_of(num_layers: int = 4, options=ALL, pinned=None, min_count=None, max_count=None) -> SearchSpace:
    raw = {"options": list(options) if isinstance(options, (list, tuple)) else options,
           "pinned": pinned or {}, "min_count": min_count or {}, "max_count": max_count or {}}
    return SearchSpace.from_mapping(raw, num_layers)


def refused(field: str, *fragments: str):
    """The UserError's message starts with the field it is about and contains each fragment."""
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(UserError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert message.startswith(f"{field}: "), message
            assert "\n" not in message, message
            for fragment in fragments:
                assert fragment in message, message
            return handled

    return Check()


# --- validation ---------------------------------------------------------------------------------------------


def test_default_space_is_accepted():
    space = space_of()
    assert space.options == tuple(ALL)
    assert space.free_layers() == [0, 1, 2, 3]


def test_min_above_max_is_refused():
    with refused("space.min_count", "linear=3", "space.max_count linear=2"):
        space_of(min_count={"linear": 3}, max_count={"linear": 2})


def test_minimums_needing_more_layers_than_the_model_has_are_refused():
    with refused("space.min_count", "needs 6 layers", "the model has 4"):
        space_of(min_count={"softmax": 3, "linear": 3})


def test_minimums_that_the_free_layers_cannot_meet_together_are_refused():
    # each minimum alone fits in the 2 free layers, together they need 3
    with refused("space.min_count", "2 free", "3 needed"):
        space_of(pinned={0: "softmax", 1: "softmax"}, min_count={"linear": 2, "none": 1})


def test_maximums_that_cannot_fill_the_model_are_refused():
    with refused("space.max_count", "at most 2", "4 free layers"):
        space_of(options=["softmax", "linear"], max_count={"softmax": 1, "linear": 1})


def test_pinned_beyond_max_count_is_refused():
    with refused("space.pinned", "2 layers pinned to softmax", "space.max_count softmax=1"):
        space_of(pinned={0: "softmax", 3: "softmax"}, max_count={"softmax": 1})


def test_count_outside_the_layer_range_is_refused():
    with refused("space.max_count", "none=5", "0..4"):
        space_of(max_count={"none": 5})
    with refused("space.min_count", "linear=-1", "0..4"):
        space_of(min_count={"linear": -1})


def test_unknown_option_is_refused_with_suggestion():
    with refused("space.options", "'lineer'", "did you mean 'linear'"):
        space_of(options=["softmax", "lineer"])


def test_unknown_option_in_bounds_is_refused():
    with refused("space.max_count", "'nonee'", "did you mean 'none'"):
        space_of(max_count={"nonee": 1})
    with refused("space.min_count", "'softmx'", "did you mean 'softmax'"):
        space_of(min_count={"softmx": 1})


def test_min_count_of_an_option_outside_the_space_is_refused():
    with refused("space.min_count", "'none' is not in space.options"):
        space_of(options=["softmax", "linear"], min_count={"none": 1})


def test_options_must_be_a_non_empty_list_without_repeats():
    with refused("space.options", "empty"):
        space_of(options=[])
    with refused("space.options", "not a list"):
        space_of(options="softmax")
    with refused("space.options", "twice"):
        space_of(options=["softmax", "softmax"])


def test_pinned_layer_out_of_range_is_refused():
    with refused("space.pinned", "layer 4 does not exist", "0..3"):
        space_of(pinned={4: "softmax"})
    with refused("space.pinned", "layer -1 does not exist"):
        space_of(pinned={-1: "softmax"})


def test_pinned_layer_must_be_a_number_and_a_known_option():
    with refused("space.pinned", "'first'", "not a whole number"):
        space_of(pinned={"first": "softmax"})
    with refused("space.pinned", "layer 1 pinned to unknown option 'sofmax'", "did you mean 'softmax'"):
        space_of(pinned={1: "sofmax"})


def test_count_must_be_a_whole_number():
    with refused("space.max_count", "not a whole number"):
        space_of(max_count={"none": "two"})


# --- suggest / params_of / violation / project --------------------------------------------------------------


def test_distributions_cover_only_free_layers():
    space = space_of(pinned={0: "softmax", 3: "none"})
    assert sorted(distributions(space)) == [layer_param(1), layer_param(2)]
    assert all(d.choices == tuple(ALL) for d in distributions(space).values())


def test_suggest_reproduces_enqueued_params_and_keeps_pinned_layers():
    space = space_of(pinned={0: "softmax"})
    plan = LayerPlan(("softmax", "linear", "none", "linear"))
    study = optuna.create_study(directions=["minimize"])
    study.enqueue_trial(space.params_of(plan))
    trial = study.ask(distributions(space))
    assert suggest(space, trial) == plan
    assert layer_param(0) not in trial.params
    assert space.params_of(plan) == {"layer_001": "linear", "layer_002": "none", "layer_003": "linear"}


def test_suggest_samples_only_allowed_options():
    space = space_of(options=["softmax", "linear"], pinned={2: "none"})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        plan = suggest(space, study.ask(distributions(space)))
        assert plan.layers[2] == "none"
        assert {plan.layers[i] for i in (0, 1, 3)} <= {"softmax", "linear"}


def test_violation_names_the_broken_constraint():
    space = space_of(options=["softmax", "linear"], pinned={0: "softmax"}, min_count={"linear": 1},
                     max_count={"softmax": 3})
    assert space.violation(LayerPlan.from_string("SLSL")) is None
    assert space.violation(LayerPlan.from_string("LLSS")) == "layer 0 must be softmax"
    assert space.violation(LayerPlan.from_string("SNSL")) == "layer 1 uses none, not in ['softmax', 'linear']"
    assert space.violation(LayerPlan.from_string("SSSS")) == "0 linear layers < min 1"
    space = space_of(max_count={"none": 1})
    assert space.violation(LayerPlan.from_string("SNNS")) == "2 none layers > max 1"
    assert space.violation(LayerPlan.from_string("SSS")) == "3 layers, the model has 4"


def test_project_forces_pinned_and_replaces_disallowed_options():
    space = space_of(options=["softmax", "linear"], pinned={3: "none"})
    assert str(space.project(LayerPlan.from_string("NLNL"))) == "SLSN"
    no_softmax = space_of(options=["linear", "none"])
    assert str(no_softmax.project(LayerPlan.from_string("SNSL"))) == "LNLL"


# --- seeds --------------------------------------------------------------------------------------------------

# Single-swap sensitivity of a 6-layer model: layers 4 and 1 lose least without attention; among the rest,
# layers 5 and 2 lose least with linear attention.
NONE_KL = [0.9, 0.1, 0.5, 0.7, 0.05, 0.6]
LINEAR_KL = [0.30, 0.01, 0.02, 0.20, 0.40, 0.03]


def rows(none=NONE_KL, linear=LINEAR_KL):
    out = []
    for layer in range(len(none)):
        out.append({"layer": layer, "option": "linear", "kl": linear[layer]})
        out.append({"layer": layer, "option": "none", "kl": none[layer]})
    return out


def test_heuristic_plan_removes_and_linearises_the_least_sensitive_layers():
    assert str(heuristic_plan(rows(), 6, n_none=2, n_linear=2)) == "SNLSNL"
    assert str(heuristic_plan(rows(), 6, n_none=0, n_linear=3)) == "SLLSSL"
    assert str(heuristic_plan(rows(), 6, n_none=1, n_linear=0)) == "SSSSNS"
    assert str(heuristic_plan(rows(), 6, n_none=0, n_linear=0)) == "SSSSSS"


def test_heuristic_plan_uses_the_requested_metric():
    table = [dict(r, nll_delta=-r["kl"]) for r in rows()]  # reversed order of sensitivity
    assert str(heuristic_plan(table, 6, n_none=1, n_linear=0, metric="nll_delta")) == "NSSSSS"


def test_heuristic_sweep_returns_distinct_labelled_plans():
    sweep = heuristic_sweep(rows(), 6, count=8)
    plans = [str(plan) for _, plan in sweep]
    assert 2 <= len(plans) <= 8
    assert len(set(plans)) == len(plans)
    assert "SSSSSS" in plans
    for label, plan in sweep:
        assert label.startswith("heuristic(none=")
        n_none = int(label.split("none=")[1].split(",")[0])
        n_linear = int(label.split("linear=")[1].rstrip(")"))
        assert plan == heuristic_plan(rows(), 6, n_none, n_linear)


def test_retrieval_ranked_seeds_keep_softmax_where_a_linear_swap_loses_most_retrieval():
    nll = [0.10, 0.90, 0.05, 0.40, 0.20, 0.70]  # layer 1 loses most, then 5, then 3
    table = [dict(r, retrieval_nll=nll[r["layer"]] if r["option"] == "linear" else 9.0) for r in rows()]
    seeds = retrieval_ranked_plans(table, 6, shares=(0.2, 0.5))
    assert [str(plan) for _, plan in seeds] == ["LSLLLL", "LSLSLS"]
    assert all(label.startswith("retrieval-ranked(softmax at the ") for label, _ in seeds)
    assert retrieval_ranked_plans(rows(), 6) == []  # no retrieval metrics: no seeds
    labels = [label for label, _ in seed_plans(table, 6)]
    assert labels.index(seeds[0][0]) < next(i for i, l in enumerate(labels) if l.startswith("heuristic"))


def test_seed_plans_start_with_all_softmax_and_work_without_a_table():
    seeds = seed_plans(rows(), 6)
    assert seeds[0] == ("all-softmax", LayerPlan.uniform("softmax", 6))
    assert any(label.startswith("heuristic") for label, _ in seeds)
    without = seed_plans(None, 6)
    assert not any(label.startswith("heuristic") for label, _ in without)
    assert [label for label, _ in without[1:]] == [label for label, _ in interleaved_plans(6)]


def test_enqueue_seeds_only_once_per_study():
    space = space_of(num_layers=6)
    study = optuna.create_study(directions=["minimize", "minimize"])
    seeds = seed_plans(rows(), 6)
    first = enqueue_seeds(study, space, seeds)
    distinct = len({str(space.project(plan)) for _, plan in seeds})
    assert first == distinct
    assert enqueue_seeds(study, space, seeds) == 0
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    assert len(waiting) == first
    assert waiting[0].user_attrs[LABEL_ATTR] == "all-softmax"


def test_enqueue_seeds_drops_seeds_outside_the_space_and_projects_the_rest():
    space = space_of(num_layers=6, options=["softmax", "linear"], max_count={"linear": 3})
    study = optuna.create_study(directions=["minimize", "minimize"])
    count = enqueue_seeds(study, space, seed_plans(rows(), 6))
    plans = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fixed = trial.system_attrs["fixed_params"]  # where Optuna keeps an enqueued trial's parameters
        plan = LayerPlan(tuple(fixed[layer_param(i)] for i in range(6)))
        assert space.violation(plan) is None, plan
        plans.append(str(plan))
    assert len(plans) == count == len(set(plans))


def toy_cost():
    """Latency of a 6-layer plan: 1 s fixed, 0.3 s per softmax layer, 0.1 s per linear layer."""
    from layerboost_surrogates.cost_model import AdditiveCostModel

    return AdditiveCostModel(base_seconds=1.0, per_layer_seconds={"softmax": 0.3, "linear": 0.1, "none": 0.0},
                             uniform_seconds={}, workload={}, device="cpu", settings={"num_layers": 6})


def test_additive_front_seeds_are_the_exact_additive_optimum_at_their_latency():
    from itertools import product

    from layerboost_search.seeds import additive_front_plans

    cost = toy_cost()
    space = space_of(num_layers=6)
    score = {(r["layer"], r["option"]): r["kl"] for r in rows()}
    seeds = additive_front_plans(rows(), space, cost, count=5)
    assert 2 <= len(seeds) <= 5 and all(label.startswith("additive-front(") for label, _ in seeds)
    everything = [LayerPlan(names) for names in product(ALL, repeat=6)]
    summed = {str(p): sum(score[(i, o)] for i, o in enumerate(p.layers) if o != "softmax") for p in everything}
    for _, plan in seeds:
        latency = cost.latency(plan)
        best = min(summed[str(p)] for p in everything if cost.latency(p) <= latency + 1e-9)
        assert summed[str(plan)] == pytest.approx(best), plan
    assert "SSSSSS" not in [str(p) for _, p in seeds]  # all-softmax is its own seed


def test_seed_plans_put_the_additive_front_before_the_heuristic():
    cost = toy_cost()
    labels = [label for label, _ in seed_plans(rows(), 6, space=space_of(num_layers=6), cost=cost, front_count=3)]
    first_front = next(i for i, l in enumerate(labels) if l.startswith("additive-front"))
    first_heuristic = next(i for i, l in enumerate(labels) if l.startswith("heuristic"))
    assert labels[0] == "all-softmax" and first_front < first_heuristic


@pytest.mark.parametrize("field,value,message", [
    ("max_loss", "abc", "surrogate.max_loss: 'abc' must be a positive number"),
    ("max_loss", 0.0, "surrogate.max_loss: 0.0 must be a positive number"),
    ("count", 0, "surrogate.count: 0 must be an integer >= 1"),
    ("start_after", -1, "surrogate.start_after: -1 must be an integer >= 0"),
])
def test_surrogate_settings_are_refused_with_the_field_named(field, value, message):
    from layerboost_search.settings import SurrogateSettings

    SurrogateSettings()  # the defaults pass
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(")):
        SurrogateSettings(**{field: value})


# --- narrowing the space before a study opens ------------------------------------------------------------------


class _Config:
    def __init__(self, kv_heads):
        self.num_key_value_heads = kv_heads

    def get_text_config(self, decoder=True):
        return self


def _Cost(kv=None, **per_layer):
    """A prefill-only serving cost model whose options' uniform plans measured `per_layer` seconds per layer in
    each of three rounds (+-1%); `kv`: cache bytes of one layer per option."""
    from layerboost_surrogates.serving_cost import ServingCostModel

    kv = kv or {o: 0 for o in per_layer}
    rounds = {o: {"prefill": [4 * v * f for f in (1.0, 1.01, 0.99)], "step": [[], [], []]} for o, v in per_layer.items()}
    return ServingCostModel(workload={"prefill": 64, "decode": 0, "batch": 1, "memory_gib": None, "repeats": 3},
                            grid=[], base_prefill_s=0.0, prefill_s=dict(per_layer), base_step_s=[],
                            step_s={o: [] for o in per_layer}, kv_layer_bytes={o: [b] * 4 for o, b in kv.items()},
                            weight_bytes=0, rounds=rounds, device="cpu", settings={"num_layers": 4})


def test_narrow_drops_what_the_model_cannot_run_and_what_softmax_beats():
    from layerboost_search.space import narrow

    space = SearchSpace(4, ("softmax", "linear", "none", "mixed1", "mixed2"), pinned={0: "linear"})
    # Gemma 3 270M's one KV head: no mixed option; SmolLM2's three: both
    narrowed, notes = narrow(space, _Config(1), facts=16)
    assert narrowed.options == ("softmax", "linear", "none")
    assert [n.split(":")[0] for n in notes] == ["mixed1", "mixed2"] and "this one has 1" in notes[0]
    assert narrow(space, _Config(3), facts=16) == (space, [])
    assert narrow(space, _Config(3), facts=0)[0].options == ("softmax", "linear", "none")  # no facts: no heads to keep
    # measured slower than softmax in every round: linear is dominated in every layer; pinned layers stay
    cost = _Cost(softmax=0.015, linear=0.020, none=0.0, mixed1=0.012, mixed2=0.015)
    narrowed, notes = narrow(space, _Config(3), 16, cost)
    assert narrowed.options == ("softmax", "none", "mixed1", "mixed2") and narrowed.pinned == {0: "linear"}
    assert notes[0] == ("linear: measured no cheaper than softmax in every round at this workload (prefill 20.0 vs "
                        "15.0 ms per layer)")
    # mixed2 measured the same as softmax, +-1% each round: its rounds overlap softmax's, so it is kept
    # where cache bytes matter (a memory budget, or memory an objective), an option with a smaller cache is kept too
    kv = {"softmax": 100, "linear": 10, "none": 0, "mixed1": 40, "mixed2": 70}
    cost = _Cost(kv, softmax=0.015, linear=0.020, none=0.0, mixed1=0.012, mixed2=0.015)
    assert narrow(space, _Config(3), 16, cost, kv_matters=True)[0].options == space.options
    assert narrow(space, _Config(3), 16, cost, prune_dominated=False)[0] == space


def test_the_heuristic_tiers_through_another_option_where_linear_was_narrowed_away():
    from layerboost_search.seeds import middle_tier

    without_linear = [r if r["option"] != "linear" else {**r, "option": "mixed1"} for r in rows()]
    assert middle_tier(["none", "mixed1"]) == "mixed1" and middle_tier(["linear", "mixed1"]) == "linear"
    assert middle_tier(["none"]) is None
    sweep = heuristic_sweep(without_linear, 6, count=8)
    assert all("linear" not in plan.layers for _, plan in sweep) and any("mixed1" in plan.layers for _, plan in sweep)
    assert all(label.startswith("heuristic(none=") and ",mixed1=" in label for label, _ in sweep)
    only_none = heuristic_sweep([r for r in rows() if r["option"] == "none"], 6, count=8)
    assert {plan.count("softmax") + plan.count("none") for _, plan in only_none} == {6}


def test_narrowing_that_leaves_nothing_to_search_is_one_line():
    from layerboost_core.errors import UserError
    from layerboost_search.settings import SearchSettings, default_space
    from layerboost_search.space import narrow

    space = SearchSpace(4, ("softmax", "linear"))
    with pytest.raises(UserError, match=r"^space.options: \['softmax', 'linear'\] leaves \['softmax'\] to search .*"
                                        r"set space.prune_dominated=false"):
        narrow(space, _Config(3), 16, _Cost(softmax=0.01, linear=0.02))
    with pytest.raises(UserError, match=r"^space.min_count: asks for linear, which is not searched here"):
        narrow(SearchSpace(4, ("softmax", "linear", "none"), min_count={"linear": 1}), _Config(3), 16,
               _Cost(softmax=0.01, linear=0.02, none=0.0))
    with pytest.raises(UserError, match=r"^space.prune_dominated: 'maybe' is not true or false"):
        SearchSettings(space={**default_space(), "prune_dominated": "maybe"})
