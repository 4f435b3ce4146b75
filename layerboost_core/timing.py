"""Timing things side by side: callables (or plans) take turns, round-robin, so a drift of the machine (another
job, clocks, thermal state) hits them alike, and ratios taken within one round compare like with like.

    times = time_plans(switcher, {"all-softmax": softmax_plan, "mine": plan}, lambda model: model(ids),
                       rounds=3, warmup=1)
    summary = summarize(times, baseline="all-softmax")   # median/min/max/n per label, per-round ratios

Every round calls every label once, in order (reversed every other round with `alternate=True`, so no label
always runs right after the same neighbour); the first `warmup` rounds pay for allocations and kernel
selection and are not counted. On CUDA the device is synchronised before the clock starts and before it
stops, so a time covers the queued kernels and not just their launch.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .plan import LayerPlan


def _synchronizer(device) -> Callable[[], None]:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_rounds(calls: Mapping[str, Callable[[], Any]], rounds: int = 3, warmup: int = 1, *,
                before: Callable[[str], None] | None = None, after: Callable[[str, Any], None] | None = None,
                device=None, alternate: bool = False,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every counted round per label: {label: [round 1, round 2, ...]}.

    `before(label)` runs untimed before each call (e.g. apply the label's plan); `after(label, returned)` runs
    untimed after each counted call with what the call returned (e.g. decode steps after a timed prefill).
    `device`: synchronised around each call when it is a CUDA device. `clock` is for tests.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    sync = _synchronizer(device)
    labels = list(calls)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for index in range(warmup + rounds):
        order = labels[::-1] if alternate and index % 2 else labels
        for label in order:
            if before is not None:
                before(label)
            sync()
            start = clock()
            returned = calls[label]()
            sync()
            seconds = clock() - start
            if index >= warmup:
                times[label].append(seconds)
                if after is not None:
                    after(label, returned)
            del returned  # what a call returned (a cache, say) is not kept alive through the next call
    return times


def model_device(model) -> torch.device:
    """Where the model's input embeddings (and so its inputs) live."""
    return model.get_input_embeddings().weight.device


def time_plans(switcher, plans: Mapping[str, LayerPlan], request: Callable[[Any], Any], rounds: int = 3,
               warmup: int = 1, *, after: Callable[[str, Any], None] | None = None,
               alternate: bool = False) -> dict[str, list[float]]:
    """Seconds of `request(model)` under each plan, plans taking turns (see `time_rounds`), in inference mode.

    The switcher (layerboost_core.patch.PlanSwitcher) applies each plan before its call, untimed, and is
    restored to all-softmax afterwards.
    """
    model = switcher.model
    try:
        with torch.inference_mode():
            return time_rounds({label: (lambda: request(model)) for label in plans}, rounds, warmup,
                               before=lambda label: switcher.apply(plans[label]), after=after,
                               device=model_device(model), alternate=alternate)
    finally:
        switcher.restore()


def spread(values) -> dict:
    """Median, min, max and count of the finite values (NaN and inf are left out; all None when none is left)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite), "n": len(finite)}


def round_ratios(times: Mapping[str, list[float]], baseline: str) -> dict[str, list[float]]:
    """Per label, its time over the baseline's in the same round (< 1: faster than the baseline)."""
    if baseline not in times:
        raise KeyError(f"baseline {baseline!r} is not among the timed labels {list(times)}")
    base = times[baseline]
    return {label: [t / b if b else float("nan") for t, b in zip(values, base)] for label, values in times.items()}


def summarize(times: Mapping[str, list[float]], baseline: str | None = None) -> dict[str, dict]:
    """Per label, the spread of its seconds; with `baseline`, also `ratio`: the spread of its per-round time
    ratio to the baseline (the median of ratios, not the ratio of medians: each ratio compares one round)."""
    ratios = round_ratios(times, baseline) if baseline is not None else {}
    out = {}
    for label, values in times.items():
        out[label] = spread(values)
        if baseline is not None:
            out[label]["ratio"] = spread(ratios[label])
    return out
