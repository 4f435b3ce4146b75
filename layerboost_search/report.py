"""Reports of a study: trials.csv, pareto.csv, pareto.html, best/*.json, summary.md and a printed table.

Every fidelity keeps its own columns (the proxy's, and `<rung>:<metric>` with a 90% interval over blocks for
each rung of the ladder, see fidelity.py); a proxy-front plan that another plan dominates at a rung is marked
(`dominated_at`), not hidden; best plans are picked at the highest fidelity measured."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from layerboost_core.cache_dir import atomic_path, write_json, write_text
from layerboost_core.plan import LayerPlan
from layerboost_core.tables import write_csv

from .study import FEASIBLE_ATTR, LABEL_ATTR, PLAN_ATTR, lm_eval_scores
from .fidelity import bootstrap_interval, dominated_at, fastest_keeping, proxy_metrics, retained, rung_scores

PROXY = "proxy"  # the lowest fidelity: what every trial was measured at during the search
KEEP_BARS = (0.99, 0.95, 0.9)  # best/keep-<pct>.json: the fastest plan keeping this share of the original


class Ladder:
    """What the study holds per fidelity: the proxy for every trial, and each rung's re-measured trials."""

    def __init__(self, study: optuna.Study, objectives, rungs=()):
        self.scores = rung_scores(study)
        # configured rungs first, in their order; rungs the study holds but the settings no longer name after
        self.rungs = [r for r in rungs if r in self.scores] + sorted(set(self.scores) - set(rungs))
        self.quality, self.direction = objectives[0].name, objectives[0].direction
        # predicted latency is the same at every fidelity: the cost model does not depend on the text
        self.latency = {t.number: t.values[1] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}

    @property
    def top(self) -> str:
        """The highest fidelity measured."""
        return self.rungs[-1] if self.rungs else PROXY

    def quality_of(self, metrics: dict) -> float | None:
        """The quality objective in a fidelity's `metrics`, as a value to minimise: the same metric when it was
        measured there, else KL (the objective is an lm-eval task, which a rung does not run)."""
        if self.quality in metrics:
            return metrics[self.quality] if self.direction == "minimize" else -metrics[self.quality]
        return metrics.get("kl")

    def measured(self, rung: str) -> dict[int, dict]:
        """{trial: its metrics at `rung`} of the completed trials measured there."""
        return {n: s["metrics"] for n, s in self.scores.get(rung, {}).items() if n in self.latency}

    def columns(self, number: int) -> dict:
        """`<rung>:<metric>` with `_lo` / `_hi` (90% bootstrap interval over blocks) for each rung."""
        row = {}
        for rung in self.rungs:
            scored = self.scores[rung].get(number)
            if scored is None:
                continue
            for name, value in scored["metrics"].items():
                lo, hi = bootstrap_interval(scored["per_block"][name])
                row.update({f"{rung}:{name}": value, f"{rung}:{name}_lo": lo, f"{rung}:{name}_hi": hi})
        return row

    def dominated(self) -> dict[int, str]:
        """{trial: the highest rung at which another plan re-measured there dominates it}."""
        points = {rung: {n: (self.quality_of(m), self.latency[n]) for n, m in self.measured(rung).items()}
                  for rung in self.rungs}
        return dominated_at(points, self.rungs)

    def candidates(self, front) -> dict[int, tuple[dict, float]]:
        """{trial: (its metrics at the highest fidelity, latency)}: the plans best/*.json are picked from (the
        proxy front when no rung was measured)."""
        if self.rungs:
            return {n: (m, self.latency[n]) for n, m in self.measured(self.top).items()}
        # the objective itself too: it may be an lm-eval task, and then it ranks the proxy front, as searched
        return {t.number: ({**proxy_metrics(t), self.quality: t.values[0]}, t.values[1]) for t in front}


def original_attention(kinds: list[str] | None) -> str:
    """The original model's attention per layer as one string aligned with plan strings: `G` global, `w`
    sliding window; "" when every layer is global (nothing to show: a plan's `S` is then always global)."""
    if not kinds or all(k == "global" for k in kinds):
        return ""
    return "".join("G" if k == "global" else "w" for k in kinds)


def kept_by_kind(plan: str, original: str) -> dict:
    """How many of the original's global and sliding-window layers a plan keeps as softmax (`S` keeps each
    layer's own attention, so a local layer stays local): {"softmax_global": "k/n", "softmax_local": "k/n"}."""
    out = {}
    for column, mark in (("softmax_global", "G"), ("softmax_local", "w")):
        layers = [i for i, m in enumerate(original) if m == mark]
        out[column] = f"{sum(plan[i] == 'S' for i in layers)}/{len(layers)}" if len(plan) == len(original) else ""
    return out


def trial_rows(study: optuna.Study, objectives, ladder: Ladder, original: str = "") -> list[dict]:
    marked = ladder.dominated()
    rows, scored = [], lm_eval_scores(study)
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "plan": t.user_attrs.get(PLAN_ATTR, ""),
               "plan_id": t.user_attrs.get("plan_id", ""), "label": t.user_attrs.get(LABEL_ATTR, ""),
               "feasible": t.user_attrs.get(FEASIBLE_ATTR, "")}
        for i, o in enumerate(objectives):
            row[o.name] = t.values[i] if t.values else ""
        if original:
            row.update(kept_by_kind(row["plan"], original))
        for key, value in sorted(t.user_attrs.items()):
            if key.startswith("proxy:") or key in ("kv_bytes", "eval_seconds", "skipped", "fail_reason"):
                row[key] = value
        row.update({f"lm_eval:{task}": v for task, v in scored.get(t.number, {}).items()})
        row.update(ladder.columns(t.number))
        row["dominated_at"] = marked.get(t.number, "")
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


def plan_json(trial, objectives, context: dict, lm_eval: dict | None = None, rungs: dict | None = None) -> dict:
    """The plan JSON of `trial`; `lm_eval`: its lm-eval scores {task: accuracy}, if it has any; `rungs`: its
    higher-fidelity measurements {rung: {"metrics": ..., "per_block": ...}}, if it has any."""
    plan = LayerPlan.from_string(trial.user_attrs[PLAN_ATTR])
    metrics = {o.name: {"value": trial.values[i], "fidelity": o.fidelity, "direction": o.direction}
               for i, o in enumerate(objectives)}
    for key, value in trial.user_attrs.items():
        if key.startswith("proxy:"):
            metrics[key.removeprefix("proxy:")] = {"value": value, "fidelity": "proxy"}
    for task, value in (lm_eval or {}).items():
        metrics[f"lm_eval:{task}"] = {"value": value, "fidelity": "lm-eval"}
    for rung, scored in (rungs or {}).items():
        for name, value in scored["metrics"].items():
            blocks = scored["per_block"][name]
            metrics[f"{rung}:{name}"] = {"value": value, "fidelity": rung, "interval90": list(bootstrap_interval(blocks)),
                                         "samples": len(blocks)}  # blocks, or needle rows for retrieval
    return plan.to_json(model=context["model"], settings=context["settings"], bank_id=context["bank_id"],
                        metrics=metrics, workload=context["workload"],
                        origin={"study": context["study"], "storage": context["storage"], "trial": trial.number,
                                "label": trial.user_attrs.get(LABEL_ATTR)})


# Quality is drawn on a log axis; a plan identical to the original has KL 0, drawn at this floor instead.
LOG_FLOOR = 1e-6


def pareto_figure(rows: list[dict], objectives, front_numbers: set[int], title: str, ladder: Ladder,
                  reference: float | None):
    """Quality against speed-up over all-softmax (latency when the reference is unknown): the proxy's trials
    and front, and one trace per higher fidelity (toggled in the legend), with 90% intervals over blocks;
    retrieval accuracy as marker colour where a fidelity measured it."""
    import plotly.graph_objects as go

    q, lat = objectives[0].name, objectives[1].name
    log_axis = objectives[0].direction == "minimize"  # KL-like: orders of magnitude apart; accuracies are not
    done = [r for r in rows if r["state"] == "COMPLETE"]

    def x_of(r):
        return reference / r[lat] if reference else r[lat]

    def y_of(value):
        return max(value, LOG_FLOOR) if log_axis else value

    def hover(subset):
        return [f"#{r['number']} {r['label']}<br>{r['plan']}" for r in subset]

    def trace(subset, name, symbol, size, color):
        return go.Scatter(x=[x_of(r) for r in subset], y=[y_of(r[q]) for r in subset], mode="markers", name=name,
                          marker=dict(symbol=symbol, size=size, color=color, line=dict(width=1, color="black")),
                          text=hover(subset), hoverinfo="text+x+y")

    def colour(subset, key, default):
        """Retrieval accuracy as colour when every point has it, else one colour."""
        if subset and all(r.get(key) not in (None, "") for r in subset):
            return dict(color=[r[key] for r in subset], colorscale="Viridis", cmin=0, cmax=1, showscale=True,
                        colorbar=dict(title="retrieval_acc"))
        return dict(color=default)

    sampled = [r for r in done if r["label"] in ("sampled", "surrogate") or r["label"].startswith("surrogate")]
    heuristic = [r for r in done if r["label"].startswith("heuristic")]
    seeds = [r for r in done if r not in sampled and r not in heuristic]
    front = sorted((r for r in done if r["number"] in front_numbers), key=lambda r: r[lat])
    traces = [
        trace(sampled, "sampled trials", "circle", 7, "lightgray"),
        trace(heuristic, "paper heuristic (threshold tiers)", "diamond", 9, "orange"),
        trace(seeds, "other seeds", "square", 8, "steelblue"),
        go.Scatter(x=[x_of(r) for r in front], y=[y_of(r[q]) for r in front], mode="lines+markers",
                   name="Pareto front (proxy)", line=dict(color="crimson", shape="hv"),
                   marker=dict(size=10, **colour(front, "proxy:retrieval_acc", "crimson")),
                   text=hover(front), hoverinfo="text+x+y"),
    ]
    for i, rung in enumerate(ladder.rungs):
        metric = q if any(f"{rung}:{q}" in r for r in done) else "kl"
        key = f"{rung}:{metric}"
        measured = sorted((r for r in done if key in r), key=lambda r: r[lat])
        values = [r[key] for r in measured]
        traces.append(go.Scatter(
            x=[x_of(r) for r in measured], y=[y_of(v) for v in values], mode="lines+markers",
            name=f"re-measured at {rung} ({metric})", line=dict(dash="dot", shape="hv"),
            marker=dict(symbol="star", size=12, **colour(measured, f"{rung}:retrieval_acc", None)),
            error_y=dict(type="data", symmetric=False, array=[r[f"{key}_hi"] - v for r, v in zip(measured, values)],
                         arrayminus=[v - r[f"{key}_lo"] for r, v in zip(measured, values)]),
            text=[f"{t}<br>dominated at {r['dominated_at']}" if r["dominated_at"] else t
                  for t, r in zip(hover(measured), measured)], hoverinfo="text+x+y"))
    fig = go.Figure(traces)
    x_title = "speed-up over all-softmax (predicted, cost-model)" if reference else f"{lat} (predicted, cost-model)"
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_type="log" if log_axis else "linear",
                      yaxis_title=f"{q} ({objectives[0].direction}; proxy, or the metric named in the legend"
                                  + (f"; 0 drawn at {LOG_FLOOR:g})" if log_axis else ")"),
                      template="plotly_white")
    return fig


def pick_best(ladder: Ladder, front, objectives, reference: float | None, latency_targets):
    """({best file name: trial number}, [one line per target no plan meets]) at the highest fidelity measured:
    `keep-<pct>pct`, the fastest plan keeping that share of the original (see fidelity.retained), and
    `latency-<pct>pct`, the best-quality plan predicted at or under that share of all-softmax latency."""
    candidates = ladder.candidates(front)
    at = f"measured at fidelity `{ladder.top}`"
    chosen, unmet = {}, []
    for bar in KEEP_BARS:
        name, number = f"keep-{round(bar * 100)}pct", fastest_keeping(candidates, bar)
        if number is not None:
            chosen[name] = number
            continue
        kept = [(retained(m) or 0.0, n) for n, (m, _) in candidates.items()]
        best = f" (the most kept: {max(kept)[0]:.3f}, trial {max(kept)[1]})" if kept else ""
        unmet.append(f"`{name}`: no plan {at} keeps {bar:.0%} of the original's top-1 agreement{best}")
    for fraction in latency_targets if reference is not None else ():
        name = f"latency-{round(fraction * 100)}pct"
        fitting = [n for n, (_, lat) in candidates.items() if lat <= fraction * reference]
        if fitting:
            chosen[name] = min(fitting, key=lambda n: ladder.quality_of(candidates[n][0]))
        else:
            unmet.append(f"`{name}`: no plan {at} is predicted at <= {fraction:.0%} of all-softmax latency")
    return chosen, unmet


def front_table(front, objectives, ladder: Ladder, scored: dict, marked: dict, original: str = "") -> str:
    """The proxy front as a markdown table, with lm-eval scores and each rung's quality (90% interval); with
    `original` (see original_attention), a first row shows the original model's global/local layers."""
    tasks = sorted({task for scores in scored.values() for task in scores})
    rung_cols = [(rung, objectives[0].name if any(objectives[0].name in m for m in ladder.measured(rung).values())
                  else "kl") for rung in ladder.rungs]
    lines = [f"| trial | label | plan | {objectives[0].name} | {objectives[1].name} | kv_bytes | "
             + "".join(f"lm_eval:{task} | " for task in tasks)
             + "".join(f"{rung}:{metric} [90%] | " for rung, metric in rung_cols) + "dominated_at |",
             "|---" * (7 + len(tasks) + len(rung_cols)) + "|"]
    if original:
        lines.append(f"| | original (G global, w sliding window) | `{original}` |" + " |" * (4 + len(tasks) + len(rung_cols)))
    for t in front:
        lm_eval = scored.get(t.number, {})
        cells = [f"{lm_eval[task]:.3f}" if task in lm_eval else "" for task in tasks]
        for rung, metric in rung_cols:
            got = ladder.scores[rung].get(t.number)
            if got is None or metric not in got["metrics"]:
                cells.append("")
                continue
            lo, hi = bootstrap_interval(got["per_block"][metric])
            cells.append(f"{got['metrics'][metric]:.4f} [{lo:.4f}, {hi:.4f}]")
        lines.append(f"| {t.number} | {t.user_attrs.get(LABEL_ATTR)} | `{t.user_attrs.get(PLAN_ATTR)}` | "
                     f"{t.values[0]:.4f} | {t.values[1]:.3f} | {t.user_attrs.get('kv_bytes', '')} | "
                     + "".join(f"{c} | " for c in cells) + f"{marked.get(t.number, '')} |")
    return "\n".join(lines)


def write_report(study: optuna.Study, objectives, run_dir: Path, context: dict, latency_targets, rungs=()) -> str:
    """Write every report file into `run_dir`; returns the printed summary (front table and best plans).
    `rungs`: the fidelity rungs' names, lowest first (rungs the study holds beyond them come after)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ladder = Ladder(study, objectives, rungs)
    original = original_attention(context.get("layer_kinds"))
    rows = trial_rows(study, objectives, ladder, original)
    write_csv(run_dir / "trials.csv", rows)
    front = front_trials(study)
    numbers = {t.number for t in front}
    write_csv(run_dir / "pareto.csv", [r for r in rows if r["number"] in numbers])
    reference = context.get("softmax_latency")
    fig = pareto_figure(rows, objectives, numbers, f"{context['model']['name']}: {context['study']}", ladder, reference)
    with atomic_path(run_dir / "pareto.html") as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)

    best_dir = run_dir / "best"
    best_dir.mkdir(exist_ok=True)
    scored = lm_eval_scores(study)
    chosen, unmet = pick_best(ladder, front, objectives, reference, latency_targets)
    knee_trial = knee(front, objectives)
    if knee_trial is not None:
        chosen["knee"] = knee_trial.number
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for name, number in chosen.items():
        measured = {rung: ladder.scores[rung][number] for rung in ladder.rungs if number in ladder.scores[rung]}
        write_json(best_dir / f"{name}.json", plan_json(trials[number], objectives, context, scored.get(number), measured))

    marked = ladder.dominated()
    best_lines = [f"- `best/{name}.json`: trial {number} `{trials[number].user_attrs.get(PLAN_ATTR)}`"
                  + (" (knee of the proxy front: its shape, not a quality bar)" if name == "knee" else "")
                  for name, number in chosen.items()] + [f"- {line}" for line in unmet]
    table = "\n".join([front_table(front, objectives, ladder, scored, marked, original), "",
                       f"Best plans, picked at fidelity `{ladder.top}` (quality kept = top-1 agreement with the "
                       f"original, exp(-KL) where not measured):", *best_lines])
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    dominated = [f"{n} (at {rung})" for n, rung in sorted(marked.items()) if n in numbers]
    summary = [f"# Search {context['study']}", "",
               f"- model: {context['model']['name']} ({context['model']['num_layers']} layers, "
               f"fingerprint {context['model']['fingerprint']}), bank {context['bank_id']}",
               f"- workload: {context['workload']}; all-softmax predicted latency {reference:.3f} s" if reference else "",
               (f"- original attention per layer: `{original}` (G global, w sliding window; a plan's `S` keeps "
                f"each layer's own; `softmax_global` / `softmax_local` in trials.csv count what a plan kept)"
                if original else ""),
               f"- storage: `{context['storage']}` (open with `optuna-dashboard {context['storage']}`)",
               f"- trials: " + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v),
               f"- fidelities: {', '.join([PROXY, *ladder.rungs])}"
               + (f"; proxy-front plans dominated at a higher fidelity: {', '.join(dominated)}" if dominated else ""),
               "", "## Pareto front (proxy) and best plans", "", table, ""]
    write_text(run_dir / "summary.md", "\n".join(summary) + "\n")
    return table
