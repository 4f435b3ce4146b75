"""Measured latency of the plans a best-plan file can name, against all-softmax, beside the cost model's prediction.

The search ranks plans by predicted latency (the additive cost model); a pick is offered on measured latency:
each candidate and the all-softmax plan serve the workload's request (prefill, then its decode steps) in turn,
round after round (layerboost_core.timing), in the driver while the evaluators are idle. Each round gives one
ratio to all-softmax; the report shows their median with a bootstrap interval, and picks on its high end.
Results live in the study's user attrs, keyed by trial, with the settings they were measured under, so a
resumed run re-measures nothing it already has.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from layerboost_core.plan import LayerPlan
from layerboost_core.timing import model_device, round_ratios, time_plans
from layerboost_surrogates.cost_model import device_name, run_request

from .study import PLAN_ATTR

log = logging.getLogger(__name__)

LATENCY_STUDY_ATTR = "latency:trial:"  # + trial number -> see `measure_latencies`
LATENCY_SETTINGS_ATTR = "latency_settings"  # what the last measurement was made under (workload, rounds, device)
REFERENCE = "all-softmax"


def latency_records(study) -> dict[int, dict]:
    """{trial number: its measured latency record} of the trials measured under the study's latest latency
    settings (a record from another device, dtype, workload or round count is not compared with them)."""
    current = study.user_attrs.get(LATENCY_SETTINGS_ATTR)
    return {int(key.removeprefix(LATENCY_STUDY_ATTR)): value for key, value in study.user_attrs.items()
            if key.startswith(LATENCY_STUDY_ATTR) and value.get("settings") == current}


def measure_latencies(study, switcher, trials: list, workload, rounds: int, cost, seed: int = 0) -> None:
    """Time every trial's plan and all-softmax at `workload`, plans taking turns for `rounds` rounds (one warm-up
    round first), and keep per trial {"seconds", "reference_seconds", "ratios", "predicted", "settings"}.
    Trials already measured under the same settings are skipped; nothing is timed when none is left."""
    device = model_device(switcher.model)
    settings = {"workload": asdict(workload), "rounds": rounds, "device": device_name(device),
                "dtype": str(switcher.model.dtype).removeprefix("torch.")}
    if rounds < 1:
        return
    study.set_user_attr(LATENCY_SETTINGS_ATTR, settings)
    done = latency_records(study)
    todo = [t for t in trials if t.number not in done]
    if not todo:
        return
    plans = {REFERENCE: LayerPlan.uniform("softmax", switcher.num_layers)}
    plans.update({str(t.number): LayerPlan.from_string(t.user_attrs[PLAN_ATTR]) for t in todo})
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, switcher.model.config.vocab_size, (workload.batch, workload.prefill),
                        generator=generator).to(device)
    log.info("latency: %d plan(s) and all-softmax taking turns, %d round(s) at %s", len(todo), rounds,
             settings["workload"])
    times = time_plans(switcher, plans, lambda model: run_request(model, ids, workload.decode), rounds=rounds,
                       warmup=1, alternate=True)
    ratios = round_ratios(times, REFERENCE)
    reference_predicted = cost.latency(plans[REFERENCE])
    for trial in todo:
        label = str(trial.number)
        study.set_user_attr(f"{LATENCY_STUDY_ATTR}{trial.number}", {
            "seconds": times[label], "reference_seconds": times[REFERENCE], "ratios": ratios[label],
            "predicted": cost.latency(plans[label]) / reference_predicted, "settings": settings})
