"""Measured serving of the plans a best file can name, against all-softmax, beside the cost model's prediction.

The search ranks plans by predicted serving (the cost model); a pick is offered on measured serving: each
candidate and the all-softmax plan serve the workload in turn (layerboost_core.serving.serve_in_turns), round
after round, each at the concurrency its own cache allows under the workload's memory budget, in the driver
while the evaluators are idle. Each round gives the candidate's ratio to all-softmax in every serving metric
(time to first token, time per output token, throughput, request latency); the report shows their medians with
bootstrap intervals and picks on the pessimistic ends. Results live in the study's user attrs, keyed by trial,
with the settings they were measured under, so a resumed run re-measures nothing it already has.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

from layerboost_core.plan import LayerPlan
from layerboost_core.serving import DECODE_STEPS, PREFILLS, Served, mean_context, serve_in_turns
from layerboost_core.timing import model_device
from layerboost_surrogates.cost_model import device_name

from .fidelity import is_original
from .study import PLAN_ATTR

log = logging.getLogger(__name__)

SERVING_STUDY_ATTR = "serving:trial:"  # + trial number -> see `measure_serving`
SERVING_SETTINGS_ATTR = "serving_settings"  # what the last measurement was made under (workload, rounds, device)
REFERENCE = "all-softmax"
METRICS = ("ttft", "tpot", "throughput", "latency")


def serving_records(study) -> dict[int, dict]:
    """{trial number: its measured serving record} of the trials measured under the study's latest settings (a
    record from another device, dtype, workload or round count is not compared with them)."""
    current = study.user_attrs.get(SERVING_SETTINGS_ATTR)
    return {int(key.removeprefix(SERVING_STUDY_ATTR)): value for key, value in study.user_attrs.items()
            if key.startswith(SERVING_STUDY_ATTR) and value.get("settings") == current}


def as_dict(served: Served) -> dict:
    return {"ttft_s": served.ttft_s, "tpot_s": served.tpot_s, "concurrency": served.concurrency,
            "decode": served.decode}


def of_dict(record: dict) -> Served:
    return Served(record["ttft_s"], record["tpot_s"], record["concurrency"], record["decode"])


def round_ratios(record: dict, metric: str) -> list[float]:
    """Per round, the candidate's `metric` over all-softmax's in the same round (throughput: a multiple, > 1 is
    better; the times: a share, < 1 is better)."""
    out = []
    for mine, theirs in zip(record["rounds"], record["reference_rounds"]):
        a, b = of_dict(mine).metric(metric), of_dict(theirs).metric(metric)
        out.append(a / b if a is not None and b else float("nan"))
    return out


def measure_serving(study, switcher, trials: list, workload, rounds: int, cost, seed: int = 0) -> dict | None:
    """Serve the workload with every trial's plan and all-softmax, plans taking turns for `rounds` rounds, each at
    its own concurrency, and keep per trial {"rounds", "reference_rounds",
    "predicted", "settings"}. Trials already measured under the same settings are skipped. Returns the work done
    ({"forwards", "tokens"}; None when nothing was measured)."""
    device = model_device(switcher.model)
    settings = {"workload": asdict(workload), "rounds": rounds, "device": device_name(device),
                "dtype": str(switcher.model.dtype).removeprefix("torch.")}
    if rounds < 1:
        return None
    study.set_user_attr(SERVING_SETTINGS_ATTR, settings)
    done = serving_records(study)
    todo = [t for t in trials if t.number not in done and not is_original(t.user_attrs[PLAN_ATTR])]
    if not todo:
        return None
    plans = {REFERENCE: LayerPlan.uniform("softmax", switcher.num_layers)}
    plans.update({str(t.number): LayerPlan.from_string(t.user_attrs[PLAN_ATTR]) for t in todo})
    concurrency = {label: cost.concurrency(plan) for label, plan in plans.items()}
    log.info("serving: %d plan(s) and all-softmax taking turns, %d round(s) at %s (concurrency: %s)", len(todo),
             rounds, settings["workload"], ", ".join(f"{k} {v}" for k, v in concurrency.items()))
    served = serve_in_turns(switcher, plans, workload, concurrency, rounds, steps=DECODE_STEPS, seed=seed)
    reference = cost.predict(plans[REFERENCE])
    for trial in todo:
        label = str(trial.number)
        predicted = cost.predict(plans[label])
        study.set_user_attr(f"{SERVING_STUDY_ATTR}{trial.number}", {
            "rounds": [as_dict(s) for s in served[label]], "reference_rounds": [as_dict(s) for s in served[REFERENCE]],
            "predicted": {m: _ratio(predicted.metric(m), reference.metric(m)) for m in METRICS},
            "predicted_values": as_dict(predicted), "settings": settings})
    return serving_work(workload, list(concurrency.values()), rounds)


def serving_work(workload, concurrencies: list[int], rounds: int, steps: int = DECODE_STEPS) -> dict:
    """Forwards and tokens of `rounds` rounds of serve_in_turns over plans at `concurrencies`."""
    per_round = [(PREFILLS + (1 if workload.decode else 0),
                  PREFILLS * workload.prefill + (mean_context(workload) if workload.decode else 0))]
    if workload.decode:
        per_round += [(steps + 1, (steps + 1) * b) for b in concurrencies]
    forwards = rounds * (len(concurrencies) * per_round[0][0] + sum(f for f, _ in per_round[1:]))
    tokens = rounds * (len(concurrencies) * per_round[0][1] + sum(t for _, t in per_round[1:]))
    return {"forwards": forwards, "tokens": tokens}


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None
