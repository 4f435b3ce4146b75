"""A finished study's front for another workload, without evaluating anything new.

Quality (the proxy on held-out text) does not depend on the workload; latency and KV bytes do, and both are
additive in the plan's options. So a new workload needs only the cost model at that workload (three uniform
plans timed once on this device, cached): every evaluated plan is re-priced, its measured front recomputed,
and the accuracy predictor fitted on the study's trials plus the exact solver give the predicted front,
including plans the study never evaluated. Written under `<run>/workloads/<tag>/`.
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
from layerboost_surrogates.cost_model import kv_bytes_per_sequence

from .study import LABEL_ATTR, PLAN_ATTR
from .surrogate_feed import SUPPORTED_METRICS

log = logging.getLogger(__name__)


def workload_tag(workload: dict) -> str:
    return f"prefill{workload['prefill']}-decode{workload['decode']}-batch{workload['batch']}"


def _non_dominated(points: list[dict], quality: str, sign: float) -> list[dict]:
    """Points no other point beats on both (sign * quality, latency), by latency."""
    return [points[i] for i in front_indices([(p["latency_s"], sign * p[quality]) for p in points])]


def resolve_front(study, objectives, space, cost, sensitivity_rows, model_config, option_settings: dict,
                  bytes_per_value: int, workload: dict, out_dir: Path, latency_ceiling=None, memory_ceiling=None,
                  n_points: int = 24) -> str:
    """Write pareto.csv (evaluated plans re-priced), predicted_front.csv and pareto.html into `out_dir`; returns
    a printable table of both fronts."""
    quality, direction = objectives[0].name, objectives[0].direction
    sign = 1.0 if direction == "minimize" else -1.0
    context = int(workload["prefill"]) + int(workload["decode"])

    def kv(plan: LayerPlan) -> int:
        return kv_bytes_per_sequence(plan, model_config, option_settings, context, bytes_per_value)

    def fits(latency: float, kv_bytes: int) -> bool:
        return ((latency_ceiling is None or latency <= float(latency_ceiling))
                and (memory_ceiling is None or kv_bytes <= float(memory_ceiling)))

    evaluated = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not t.user_attrs.get(PLAN_ATTR):
            continue
        plan = LayerPlan.from_string(t.user_attrs[PLAN_ATTR])
        evaluated.append({"number": t.number, "label": t.user_attrs.get(LABEL_ATTR, ""), "plan": str(plan),
                          quality: t.values[0], "latency_s": cost.latency(plan), "kv_bytes": kv(plan),
                          "study_latency_s": t.values[1]})
    measured_front = _non_dominated([r for r in evaluated if fits(r["latency_s"], r["kv_bytes"])], quality, sign)

    predicted = []
    if quality in SUPPORTED_METRICS:
        from layerboost_surrogates.accuracy import SensitivityTable, make_predictor
        from layerboost_surrogates.solver import FrontSolver, kv_per_layer

        table = SensitivityTable.of(sensitivity_rows, space.num_layers, quality)
        plans = [LayerPlan.from_string(r["plan"]) for r in evaluated]
        predictor = make_predictor(table, plans, [r[quality] for r in evaluated])
        kv_layer = kv_per_layer(set(space.options) | set(space.pinned.values()), model_config, option_settings,
                                context, bytes_per_value)
        solver = FrontSolver(space, cost, predictor.terms(), kv_layer)
        front = solver.predicted_front(n_points, memory_ceiling, latency_ceiling)
        means, variances = predictor.predict([p for p, _, _ in front]) if front else ([], [])
        measured = {r["plan"]: r for r in evaluated}
        for (plan, _, latency), mean, var in zip(front, means, variances):
            known = measured.get(str(plan))
            predicted.append({"plan": str(plan), f"predicted_{quality}": float(mean),
                              f"predicted_{quality}_std": float(np.sqrt(max(var, 0.0))), "latency_s": latency,
                              "kv_bytes": kv(plan), "evaluated_trial": known["number"] if known else "",
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
        go.Scatter(x=[r["latency_s"] for r in evaluated], y=[r[quality] for r in evaluated], mode="markers",
                   name="evaluated plans, re-priced", marker=dict(color="lightgray", size=7),
                   text=hover(evaluated), hoverinfo="text+x+y"),
        go.Scatter(x=[r["latency_s"] for r in measured_front], y=[r[quality] for r in measured_front],
                   mode="lines+markers", name="measured front", line=dict(color="crimson", shape="hv"),
                   text=hover(measured_front), hoverinfo="text+x+y"),
    ]
    if predicted:
        traces.append(go.Scatter(
            x=[r["latency_s"] for r in predicted], y=[r[f"predicted_{quality}"] for r in predicted],
            error_y=dict(array=[r[f"predicted_{quality}_std"] for r in predicted]), mode="lines+markers",
            name="predicted front (surrogate + exact solver)", line=dict(color="seagreen", dash="dot", shape="hv"),
            text=hover(predicted), hoverinfo="text+x+y"))
    fig = go.Figure(traces)
    fig.update_layout(title=f"front at workload {workload_tag(workload)}", xaxis_title="latency_s (cost model)",
                      yaxis_title=quality, template="plotly_white")
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)


def _table(measured_front, predicted, quality: str) -> str:
    lines = ["measured front (evaluated plans, re-priced):", f"| trial | plan | {quality} | latency_s | kv_bytes |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['number']} | `{r['plan']}` | {r[quality]:.4f} | {r['latency_s']:.3f} | {r['kv_bytes']} |"
              for r in measured_front]
    if predicted:
        lines += ["", "predicted front (surrogate):", f"| plan | predicted {quality} | ± | latency_s | kv_bytes | "
                  "evaluated |", "|---|---|---|---|---|---|"]
        lines += [f"| `{r['plan']}` | {r[f'predicted_{quality}']:.4f} | {r[f'predicted_{quality}_std']:.4f} | "
                  f"{r['latency_s']:.3f} | {r['kv_bytes']} | "
                  f"{'#' + str(r['evaluated_trial']) if r['evaluated_trial'] != '' else 'no'} |" for r in predicted]
    return "\n".join(lines)
