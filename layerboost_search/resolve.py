"""A finished study's front for another workload, without evaluating anything new.

Quality (the proxy on held-out text) does not depend on the workload; serving speed and cache bytes do. So a new
workload needs only the serving cost model at that workload (the options' uniform plans timed once on this
device, cached): every evaluated plan is re-priced, its measured front recomputed, and the accuracy predictor
fitted on the study's trials plus the exact solver give the predicted front, including plans the study never
evaluated. Written under `<run>/workloads/<tag>/`. (Quality was measured at the study's own prompt length: a
new workload with longer prompts is priced, not re-measured.)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from optuna.trial import TrialState

from layerboost_core.cache_dir import atomic_path
from layerboost_core.pareto import front_indices
from layerboost_core.plan import LayerPlan
from layerboost_core.tables import write_csv

from .study import LABEL_ATTR, PLAN_ATTR
from .surrogate_feed import SUPPORTED_METRICS

log = logging.getLogger(__name__)


def workload_tag(workload: dict) -> str:
    memory = (f"-mem{workload['memory_gib']:g}gib" if workload.get("memory_gib") is not None else
              f"-mem{workload['memory_sequences']}seq" if workload.get("memory_sequences") is not None else "")
    return f"prefill{workload['prefill']}-decode{workload['decode']}-batch{workload['batch']}{memory}"


def longer_prompt_warning(searched_prefill: int, asked_prefill: int) -> str:
    """A warning when a front is re-priced for prompts much longer than those its quality was measured on ('' if
    not): `linear` layers trained on 512-token blocks lost every planted fact at 7,680 tokens (README)."""
    if asked_prefill <= 2 * searched_prefill:
        return ""
    return (f"warning: quality and retrieval were measured on {searched_prefill:,}-token prompts, this workload's are "
            f"{asked_prefill:,}: re-priced, not re-measured, and they may not hold there (a bank trained at 512 "
            f"tokens lost every fact at 7,680); search at this workload to measure them")


def _non_dominated(points: list[dict], quality: str, sign: float) -> list[dict]:
    """Points no other point beats on both (sign * quality, latency), by latency."""
    return [points[i] for i in front_indices([(p["cost_s"], sign * p[quality]) for p in points])]


def resolve_front(study, objectives, space, cost, sensitivity_rows, workload: dict, out_dir: Path,
                  latency_ceiling=None, memory_ceiling=None, n_points: int = 24) -> str:
    """Write pareto.csv (evaluated plans re-priced), predicted_front.csv and pareto.html into `out_dir`; returns
    a printable table of both fronts. `cost`: the serving cost model at the new workload; `cost_s` is each plan's
    cost in the study's speed metric (seconds per output token for throughput)."""
    quality, direction = objectives[0].name, objectives[0].direction
    sign = 1.0 if direction == "minimize" else -1.0
    latency = cost.with_speed("latency")

    def fits(plan: LayerPlan) -> bool:
        return ((latency_ceiling is None or latency.latency(plan) <= float(latency_ceiling))
                and (memory_ceiling is None or cost.kv_bytes(plan) <= float(memory_ceiling)))

    evaluated, fitting = [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not t.user_attrs.get(PLAN_ATTR):
            continue
        plan = LayerPlan.from_string(t.user_attrs[PLAN_ATTR])
        served = cost.predict(plan)
        row = {"number": t.number, "label": t.user_attrs.get(LABEL_ATTR, ""), "plan": str(plan),
               quality: t.values[0], "cost_s": cost.latency(plan), "throughput_tok_s": served.throughput,
               "ttft_s": served.ttft_s, "tpot_s": served.tpot_s, "concurrency": served.concurrency,
               "kv_bytes": cost.kv_bytes(plan), "study_value": t.values[1]}
        evaluated.append(row)
        if fits(plan):
            fitting.append(row)
    measured_front = _non_dominated(fitting, quality, sign)

    predicted = []
    if quality in SUPPORTED_METRICS:
        from layerboost_surrogates.accuracy import SensitivityTable, make_predictor
        from layerboost_surrogates.solver import front_over_views

        table = SensitivityTable.of(sensitivity_rows, space.num_layers, quality)
        plans = [LayerPlan.from_string(r["plan"]) for r in evaluated]
        predictor = make_predictor(table, plans, [r[quality] for r in evaluated])
        front = [p for p in front_over_views(space, cost, predictor.terms(), n_points, memory_ceiling) if fits(p[0])]
        means, variances = predictor.predict([p for p, _, _ in front]) if front else ([], [])
        measured = {r["plan"]: r for r in evaluated}
        for (plan, _, plan_cost), mean, var in zip(front, means, variances):
            known = measured.get(str(plan))
            predicted.append({"plan": str(plan), f"predicted_{quality}": float(mean),
                              f"predicted_{quality}_std": float(np.sqrt(max(var, 0.0))), "cost_s": plan_cost,
                              "kv_bytes": cost.kv_bytes(plan), "evaluated_trial": known["number"] if known else "",
                              f"measured_{quality}": known[quality] if known else ""})
    else:
        log.warning("report: the predicted front needs a quality objective in %s; writing the re-priced "
                    "measured front only", ", ".join(SUPPORTED_METRICS))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "trials.csv", evaluated)
    write_csv(out_dir / "pareto.csv", measured_front)
    if predicted:
        write_csv(out_dir / "predicted_front.csv", predicted)
    _write_figure(evaluated, measured_front, predicted, quality, workload, out_dir / "pareto.html")
    return _table(measured_front, predicted, quality)


def _write_figure(evaluated, measured_front, predicted, quality: str, workload: dict, path: Path) -> None:
    import plotly.graph_objects as go

    def hover(rows):
        return [f"{r.get('label', 'predicted')}<br>{r['plan']}" for r in rows]

    traces = [
        go.Scatter(x=[r["cost_s"] for r in evaluated], y=[r[quality] for r in evaluated], mode="markers",
                   name="evaluated plans, re-priced", marker=dict(color="lightgray", size=7),
                   text=hover(evaluated), hoverinfo="text+x+y"),
        go.Scatter(x=[r["cost_s"] for r in measured_front], y=[r[quality] for r in measured_front],
                   mode="lines+markers", name="measured front", line=dict(color="crimson", shape="hv"),
                   text=hover(measured_front), hoverinfo="text+x+y"),
    ]
    if predicted:
        traces.append(go.Scatter(
            x=[r["cost_s"] for r in predicted], y=[r[f"predicted_{quality}"] for r in predicted],
            error_y=dict(array=[r[f"predicted_{quality}_std"] for r in predicted]), mode="lines+markers",
            name="predicted front (surrogate + exact solver)", line=dict(color="seagreen", dash="dot", shape="hv"),
            text=hover(predicted), hoverinfo="text+x+y"))
    fig = go.Figure(traces)
    fig.update_layout(title=f"front at workload {workload_tag(workload)}", xaxis_title="cost_s: the speed metric's cost, lower is better (cost model)",
                      yaxis_title=quality, template="plotly_white")
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)


def _table(measured_front, predicted, quality: str) -> str:
    lines = ["measured front (evaluated plans, re-priced):", f"| trial | plan | {quality} | cost_s | kv_bytes |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['number']} | `{r['plan']}` | {r[quality]:.4f} | {r['cost_s']:.3f} | {r['kv_bytes']} |"
              for r in measured_front]
    if predicted:
        lines += ["", "predicted front (surrogate):", f"| plan | predicted {quality} | ± | cost_s | kv_bytes | "
                  "evaluated |", "|---|---|---|---|---|---|"]
        lines += [f"| `{r['plan']}` | {r[f'predicted_{quality}']:.4f} | {r[f'predicted_{quality}_std']:.4f} | "
                  f"{r['cost_s']:.3f} | {r['kv_bytes']} | "
                  f"{'#' + str(r['evaluated_trial']) if r['evaluated_trial'] != '' else 'no'} |" for r in predicted]
    return "\n".join(lines)
