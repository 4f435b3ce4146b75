"""Reports of a study: trials.csv, pareto.csv, pareto.html, best/*.json, summary.md and a printed table."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from layerboost_core.cache_dir import atomic_path, write_json, write_text
from layerboost_core.plan import LayerPlan
from layerboost_core.tables import write_csv

from .driver import FEASIBLE_ATTR, LABEL_ATTR, PLAN_ATTR, lm_eval_scores


def trial_rows(study: optuna.Study, objectives) -> list[dict]:
    rows, scored = [], lm_eval_scores(study)
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "plan": t.user_attrs.get(PLAN_ATTR, ""),
               "plan_id": t.user_attrs.get("plan_id", ""), "label": t.user_attrs.get(LABEL_ATTR, ""),
               "feasible": t.user_attrs.get(FEASIBLE_ATTR, "")}
        for i, o in enumerate(objectives):
            row[o.name] = t.values[i] if t.values else ""
        for key, value in sorted(t.user_attrs.items()):
            if key.startswith("proxy:") or key in ("kv_bytes", "eval_seconds", "skipped", "fail_reason"):
                row[key] = value
        row.update({f"lm_eval:{task}": v for task, v in scored.get(t.number, {}).items()})
        row["duration_s"] = t.duration.total_seconds() if t.duration else ""
        rows.append(row)
    return rows


def front_trials(study: optuna.Study) -> list:
    """Feasible Pareto-optimal trials (Optuna's best_trials honours set_constraint), by latency."""
    return sorted(study.best_trials, key=lambda t: t.values[1])


def knee(front, objectives) -> object | None:
    """The front point farthest from the line between its two extremes (objectives scaled to [0, 1])."""
    if len(front) < 3:
        return front[0] if front else None
    q = [t.values[0] for t in front]
    lat = [t.values[1] for t in front]
    sign = 1 if objectives[0].direction == "minimize" else -1

    def norm(values, v):
        lo, hi = min(values), max(values)
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    points = [(norm(lat, t.values[1]), norm([sign * x for x in q], sign * t.values[0])) for t in front]
    (x1, y1), (x2, y2) = points[0], points[-1]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    distances = [abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / length for x, y in points]
    return front[max(range(len(front)), key=distances.__getitem__)]


def plan_json(trial, objectives, context: dict, lm_eval: dict | None = None) -> dict:
    """The plan JSON of `trial`; `lm_eval`: its lm-eval scores {task: accuracy}, if it has any."""
    plan = LayerPlan.from_string(trial.user_attrs[PLAN_ATTR])
    metrics = {o.name: {"value": trial.values[i], "fidelity": o.fidelity, "direction": o.direction}
               for i, o in enumerate(objectives)}
    for key, value in trial.user_attrs.items():
        if key.startswith("proxy:"):
            metrics[key.removeprefix("proxy:")] = {"value": value, "fidelity": "proxy"}
    for task, value in (lm_eval or {}).items():
        metrics[f"lm_eval:{task}"] = {"value": value, "fidelity": "lm-eval"}
    return plan.to_json(model=context["model"], settings=context["settings"], bank_id=context["bank_id"],
                        metrics=metrics, workload=context["workload"],
                        origin={"study": context["study"], "storage": context["storage"], "trial": trial.number,
                                "label": trial.user_attrs.get(LABEL_ATTR)})


def pareto_figure(rows: list[dict], objectives, front_numbers: set[int], title: str):
    import plotly.graph_objects as go

    q, lat = objectives[0].name, objectives[1].name
    done = [r for r in rows if r["state"] == "COMPLETE"]

    def trace(subset, name, symbol, size, color):
        return go.Scatter(x=[r[lat] for r in subset], y=[r[q] for r in subset], mode="markers", name=name,
                          marker=dict(symbol=symbol, size=size, color=color, line=dict(width=1, color="black")),
                          text=[f"#{r['number']} {r['label']}<br>{r['plan']}" for r in subset], hoverinfo="text+x+y")

    sampled = [r for r in done if r["label"] in ("sampled", "surrogate") or r["label"].startswith("surrogate")]
    heuristic = [r for r in done if r["label"].startswith("heuristic")]
    seeds = [r for r in done if r not in sampled and r not in heuristic]
    front = sorted((r for r in done if r["number"] in front_numbers), key=lambda r: r[lat])
    fig = go.Figure([
        trace(sampled, "sampled trials", "circle", 7, "lightgray"),
        trace(heuristic, "paper heuristic (threshold tiers)", "diamond", 9, "orange"),
        trace(seeds, "other seeds", "square", 8, "steelblue"),
        go.Scatter(x=[r[lat] for r in front], y=[r[q] for r in front], mode="lines+markers", name="Pareto front",
                   line=dict(color="crimson", shape="hv"), marker=dict(size=10, color="crimson"),
                   text=[f"#{r['number']} {r['label']}<br>{r['plan']}" for r in front], hoverinfo="text+x+y"),
    ])
    fig.update_layout(title=title, xaxis_title=f"{lat} (predicted, {objectives[1].fidelity})",
                      yaxis_title=f"{q} ({objectives[0].fidelity}, {objectives[0].direction})", template="plotly_white")
    return fig


def write_report(study: optuna.Study, objectives, run_dir: Path, context: dict, latency_targets) -> str:
    """Write every report file into `run_dir`; returns the printed summary table."""
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, objectives)
    write_csv(run_dir / "trials.csv", rows)
    front = front_trials(study)
    numbers = {t.number for t in front}
    write_csv(run_dir / "pareto.csv", [r for r in rows if r["number"] in numbers])
    fig = pareto_figure(rows, objectives, numbers, f"{context['model']['name']}: {context['study']}")
    with atomic_path(run_dir / "pareto.html") as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)

    best_dir = run_dir / "best"
    best_dir.mkdir(exist_ok=True)
    chosen, scored = {}, lm_eval_scores(study)
    reference = context.get("softmax_latency")
    for fraction in latency_targets:
        if reference is None:
            break
        fitting = [t for t in front if t.values[1] <= fraction * reference]
        if fitting:
            direction = objectives[0].direction
            best = (min if direction == "minimize" else max)(fitting, key=lambda t: t.values[0])
            chosen[f"latency-{int(round(fraction * 100))}pct"] = best
    knee_trial = knee(front, objectives)
    if knee_trial is not None:
        chosen["knee"] = knee_trial
    for name, trial in chosen.items():
        write_json(best_dir / f"{name}.json", plan_json(trial, objectives, context, scored.get(trial.number)))

    tasks = sorted({task for scores in scored.values() for task in scores})
    lines = [f"| trial | label | plan | {objectives[0].name} | {objectives[1].name} | kv_bytes | "
             + "".join(f"lm_eval:{task} | " for task in tasks), "|---" * (6 + len(tasks)) + "|"]
    for t in front:
        lm_eval = scored.get(t.number, {})
        lines.append(f"| {t.number} | {t.user_attrs.get(LABEL_ATTR)} | `{t.user_attrs.get(PLAN_ATTR)}` | "
                     f"{t.values[0]:.4f} | {t.values[1]:.3f} | {t.user_attrs.get('kv_bytes', '')} | "
                     + "".join(f"{lm_eval[task]:.3f} | " if task in lm_eval else "| " for task in tasks))
    table = "\n".join(lines)
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    summary = [f"# Search {context['study']}", "",
               f"- model: {context['model']['name']} ({context['model']['num_layers']} layers, "
               f"fingerprint {context['model']['fingerprint']}), bank {context['bank_id']}",
               f"- workload: {context['workload']}; all-softmax predicted latency {reference:.3f} s" if reference else "",
               f"- storage: `{context['storage']}` (open with `optuna-dashboard {context['storage']}`)",
               f"- trials: " + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v),
               f"- best plans: " + ", ".join(f"`best/{n}.json` (trial {t.number})" for n, t in chosen.items()),
               "", "## Pareto front", "", table, ""]
    write_text(run_dir / "summary.md", "\n".join(line for line in summary if line is not None) + "\n")
    return table
