"""LayerPlan: validation with exact messages, string form, stable id, JSON round trip, load_plan."""
from __future__ import annotations

import itertools
import json
import re

import pytest

from layerboost_core.attention import OPTIONS
from layerboost_core.errors import UserError
from layerboost_core.plan import PLAN_SCHEMA, LayerPlan, load_plan

MODEL_INFO = {"name": "tiny-llama", "fingerprint": "abc123", "num_layers": 3}


def allowed_names() -> str:
    return ", ".join(sorted(OPTIONS))


def allowed_codes() -> str:
    codes = {OPTIONS.get(name).code: name for name in OPTIONS}
    return ", ".join(f"{code} ({name})" for code, name in sorted(codes.items()))


def raises_exactly(message: str):
    return pytest.raises(UserError, match=f"^{re.escape(message)}$")


# --- validation ---------------------------------------------------------------------------------------------


def test_unknown_option_name_is_refused_with_suggestion():
    with raises_exactly(
        f"plan: layer 1 has unknown option 'linaer'; allowed: {allowed_names()} (did you mean 'linear'?)"
    ):
        LayerPlan(("softmax", "linaer", "none"))


def test_unknown_option_name_without_close_match():
    with raises_exactly(f"plan: layer 0 has unknown option 'xyzzy'; allowed: {allowed_names()}"):
        LayerPlan(("xyzzy",))


def test_bad_code_character_is_refused():
    with raises_exactly(f"plan: character 2 is 'X', not an option code; allowed: {allowed_codes()}"):
        LayerPlan.from_string("SLXN")


def test_lowercase_code_is_refused():
    with raises_exactly(f"plan: character 0 is 's', not an option code; allowed: {allowed_codes()}"):
        LayerPlan.from_string("sLN")


@pytest.mark.parametrize("make", [lambda: LayerPlan(()), lambda: LayerPlan.from_string(""),
                                  lambda: LayerPlan.from_string("   ")])
def test_empty_plan_is_refused(make):
    with raises_exactly("plan: a plan needs at least one layer"):
        make()


def test_check_layers_wrong_length():
    plan = LayerPlan.from_string("SLN")
    with raises_exactly("plan: has 3 layers but the model has 4"):
        plan.check_layers(4)
    assert plan.check_layers(3) is plan


def test_plan_is_frozen_and_hashable():
    plan = LayerPlan(["softmax", "none"])  # any iterable is stored as a tuple
    assert plan.layers == ("softmax", "none")
    with pytest.raises(AttributeError):
        plan.layers = ("none",)  # type: ignore[misc]
    assert {plan: 1}[LayerPlan(("softmax", "none"))] == 1


# --- string form and id -------------------------------------------------------------------------------------


def test_string_round_trip():
    plan = LayerPlan.from_string("SLN")
    assert plan.layers == ("softmax", "linear", "none")
    assert str(plan) == "SLN"
    assert LayerPlan.from_string(str(plan)) == plan
    assert len(plan) == 3


def test_string_form_ignores_surrounding_whitespace():
    assert LayerPlan.from_string("  SSL\n") == LayerPlan(("softmax", "softmax", "linear"))


def test_uniform_and_count():
    plan = LayerPlan.uniform("linear", 5)
    assert str(plan) == "LLLLL"
    assert plan.count("linear") == 5 and plan.count("softmax") == 0
    assert LayerPlan.from_string("SLLN").count("linear") == 2


def test_id_is_stable_and_short():
    plan = LayerPlan.from_string("SLNS")
    same = LayerPlan(("softmax", "linear", "none", "softmax"))
    assert plan.id == same.id
    assert re.fullmatch(r"[0-9a-f]{12}", plan.id)
    # Pinned: the id must not change between versions or processes (caches and studies are keyed by it).
    assert LayerPlan.from_string("SLN").id == "b954f545414a"


def test_different_plans_have_different_ids():
    codes = "".join(OPTIONS.get(name).code for name in OPTIONS)
    plans = [LayerPlan.from_string("".join(p)) for p in itertools.product(codes, repeat=4)]
    assert len({p.id for p in plans}) == len(plans)
    # Plans of different lengths never collide either.
    assert LayerPlan.from_string("SS").id != LayerPlan.from_string("SSS").id


# --- JSON ---------------------------------------------------------------------------------------------------


def plan_json(plan: LayerPlan, fingerprint: str = "abc123") -> dict:
    return plan.to_json(model={"name": "tiny-llama", "source": "tiny:llama", "fingerprint": fingerprint},
                        settings={"linear": {"window": 4, "feature_dim": 8}}, bank_id="bank0",
                        metrics={"kl": {"value": 0.1, "fidelity": "proxy"}}, origin={"study": "s", "trial": 3})


def test_to_json_fields():
    plan = LayerPlan.from_string("SLN")
    data = plan_json(plan)
    assert data["schema"] == PLAN_SCHEMA == "layerboost.plan/v1"
    assert data["plan"] == "SLN"
    assert data["id"] == plan.id
    assert data["num_layers"] == 3
    assert data["layers"] == ["softmax", "linear", "none"]
    assert data["bank_id"] == "bank0" and data["origin"] == {"study": "s", "trial": 3}


def test_json_round_trip_through_text():
    plan = LayerPlan.from_string("SLN")
    data = json.loads(json.dumps(plan_json(plan)))
    assert LayerPlan.from_json(data) == plan
    assert LayerPlan.from_json(data, MODEL_INFO) == plan


def test_from_json_refuses_wrong_schema():
    data = plan_json(LayerPlan.from_string("SLN"))
    data["schema"] = "layerboost.plan/v0"
    with raises_exactly("plan: schema is 'layerboost.plan/v0', expected 'layerboost.plan/v1'"):
        LayerPlan.from_json(data)


def test_from_json_refuses_other_fingerprint():
    data = plan_json(LayerPlan.from_string("SLN"), fingerprint="ffff0000")
    with raises_exactly("plan: made for model fingerprint ffff0000 (tiny-llama), "
                        "but the loaded model tiny-llama has fingerprint abc123"):
        LayerPlan.from_json(data, MODEL_INFO)


def test_from_json_refuses_other_layer_count():
    data = plan_json(LayerPlan.from_string("SLNS"))
    with raises_exactly("plan: has 4 layers but the model has 3"):
        LayerPlan.from_json(data, MODEL_INFO)


def test_from_json_without_model_section_only_checks_layers():
    data = LayerPlan.from_string("SLN").to_json()
    assert LayerPlan.from_json(data, MODEL_INFO) == LayerPlan.from_string("SLN")


def test_from_json_validates_option_names():
    data = plan_json(LayerPlan.from_string("SLN"))
    data["layers"][1] = "lineer"
    with pytest.raises(UserError, match=r"^plan: layer 1 has unknown option 'lineer'"):
        LayerPlan.from_json(data)


def test_from_json_missing_layers_is_a_user_error():
    with pytest.raises(UserError):
        LayerPlan.from_json({"schema": PLAN_SCHEMA, "plan": "SLN"})


# --- load_plan ----------------------------------------------------------------------------------------------


def test_load_plan_from_json_file(tmp_path):
    plan = LayerPlan.from_string("SLN")
    path = tmp_path / "best.json"
    path.write_text(json.dumps(plan_json(plan)))
    assert load_plan(str(path)) == plan
    assert load_plan(str(path), MODEL_INFO) == plan


def test_load_plan_from_json_file_refuses_other_model(tmp_path):
    path = tmp_path / "best.json"
    path.write_text(json.dumps(plan_json(LayerPlan.from_string("SLN"), fingerprint="0000")))
    with pytest.raises(UserError, match=r"^plan: made for model fingerprint 0000"):
        load_plan(str(path), MODEL_INFO)


def test_load_plan_from_compact_string():
    assert load_plan("SLN") == LayerPlan(("softmax", "linear", "none"))
    assert load_plan("SLN", MODEL_INFO) == LayerPlan(("softmax", "linear", "none"))


def test_load_plan_compact_string_wrong_length():
    with raises_exactly("plan: has 2 layers but the model has 3"):
        load_plan("SL", MODEL_INFO)


def test_load_plan_missing_json_file(tmp_path):
    missing = str(tmp_path / "nope.json")
    with raises_exactly(f"plan: file {missing!r} does not exist"):
        load_plan(missing)


def test_load_plan_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match=rf"^plan: {re.escape(repr(str(path)))} is not valid JSON \("):
        load_plan(str(path))


def test_load_plan_bad_compact_string():
    with pytest.raises(UserError, match=r"^plan: character 1 is 'Q', not an option code"):
        load_plan("SQ")
