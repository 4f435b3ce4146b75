"""Reports of a study: summary.md and a printed answer, trials.csv, pareto.csv, pareto.html, best/*.json.

The answer comes first: the best files, each a plan that keeps the quality and retrieval floors on text the
search never scored, with its measured latency and its intervals (picks.py). Every fidelity keeps its own
columns (the proxy's, and `<rung>:<metric>` with a 90% interval, over blocks or, for retrieval, over facts,
for each rung of the ladder, see fidelity.py); a proxy-front plan that another plan dominates at a rung is
marked (`dominated_at`), not hidden."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import optuna
from optuna.trial import TrialState

from layerboost_core.cache_dir import atomic_path, write_json, write_text
from layerboost_core.plan import LayerPlan
from layerboost_core.tables import write_csv

from .fidelity import dominated_at, proxy_metrics, rung_scores
from .objectives import speed_of
from .picks import Evidence, Floors, Interval, answer_json, answer_table, floors_line, pick
from .speed import METRICS, round_ratios, serving_records
from .study import FEASIBLE_ATTR, LABEL_ATTR, PLAN_ATTR, lm_eval_scores

PROXY = "proxy"  # the lowest fidelity: what every trial was measured at during the search
ORIGINAL_ATTR = "original_retrieval"  # study user attr: the original's retrieval at the proxy {"metrics", "facts"}


class Ladder:
    """What the study holds per fidelity: the proxy for every trial, and each rung's re-measured trials."""

    def __init__(self, study: optuna.Study, objectives, rungs=()):
        """`rungs`: the configured rungs, lowest first, as names or as RungSettings; with settings, a record a
        rung of the same name made under other settings (more blocks, other facts) is left out, not mixed in."""
        self.scores = rung_scores(study)
        current = {r.name: dataclasses.asdict(r) for r in rungs if not isinstance(r, str)}
        for name, wanted in current.items():
            self.scores[name] = {n: s for n, s in self.scores.get(name, {}).items() if s.get("settings") == wanted}
            if not self.scores[name]:
                del self.scores[name]
        names = [r if isinstance(r, str) else r.name for r in rungs]
        # configured rungs first, in their order; rungs the study holds but the settings no longer name after
        self.rungs = [r for r in names if r in self.scores] + sorted(set(self.scores) - set(names))
        self.quality, self.direction = objectives[0].name, objectives[0].direction
        # the predicted speed cost is the same at every fidelity: the cost model does not depend on the text
        self.speed = speed = speed_of(objectives)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self.cost = {t.number: speed.cost(t.values[1]) for t in complete}
        # the proxy's quality of each trial, as a value to minimise (what ranking_line compares the rungs with)
        self.proxy = {t.number: self.quality_of(proxy_metrics(t)) for t in complete}

    def quality_of(self, metrics: dict) -> float | None:
        """The quality objective in a fidelity's `metrics`, as a value to minimise: the same metric when it was
        measured there, else KL (the objective is an lm-eval task, which a rung does not run)."""
        if self.quality in metrics:
            return metrics[self.quality] if self.direction == "minimize" else -metrics[self.quality]
        return metrics.get("kl")

    def measured(self, rung: str) -> dict[int, dict]:
        """{trial: its metrics at `rung`} of the completed trials measured there."""
        return {n: s["metrics"] for n, s in self.scores.get(rung, {}).items() if n in self.cost}

    def interval(self, rung: str, number: int, metric: str) -> Interval:
        """`metric` of trial `number` at `rung` with its 90% interval: binomial over facts for a rate measured
        per fact (retrieval_acc), bootstrap over the per-fact or per-block values otherwise."""
        scored = self.scores[rung][number]
        per_fact = (scored.get("per_fact") or {}).get(metric)
        if per_fact:
            if metric == "retrieval_acc":
                return Interval.of_facts(round(sum(per_fact)), len(per_fact))
            got = Interval.of_blocks(per_fact)
        else:
            got = Interval.of_blocks(scored["per_block"][metric])
        # the recorded mean (token metrics weight blocks by their scored tokens), with the interval of the samples
        return dataclasses.replace(got, value=scored["metrics"].get(metric, got.value))

    def original_retrieval(self, rung: str, number: int) -> Interval | None:
        """The original's retrieval on the facts trial `number` was measured on at `rung`."""
        hits = (self.scores[rung][number].get("original") or {}).get("retrieval_acc")
        return Interval.of_facts(round(sum(hits)), len(hits)) if hits else None

    def columns(self, number: int) -> dict:
        """`<rung>:<metric>` with `_lo` / `_hi` (its 90% interval, see `interval`) for each rung."""
        row = {}
        for rung in self.rungs:
            if number not in self.scores[rung]:
                continue
            for name in self.scores[rung][number]["metrics"]:
                got = self.interval(rung, number, name)
                row.update({f"{rung}:{name}": got.value, f"{rung}:{name}_lo": got.lo, f"{rung}:{name}_hi": got.hi})
        return row

    def dominated(self) -> dict[int, str]:
        """{trial: the highest rung at which another plan re-measured there dominates it}."""
        points = {rung: {n: (self.quality_of(m), self.cost[n]) for n, m in self.measured(rung).items()}
                  for rung in self.rungs}
        return dominated_at(points, self.rungs)

    def evidence(self, number: int, plan: str, rung: str) -> Evidence:
        """What trial `number` was measured at `rung` (and at the other rungs, in `others`)."""
        retrieval = "retrieval_acc" in self.scores[rung][number]["metrics"]
        others = {}
        for other in self.rungs:
            if other != rung and number in self.scores[other]:
                has = "retrieval_acc" in self.scores[other][number]["metrics"]
                others[other] = {"kl": self.interval(other, number, "kl"),
                                 "retrieval": self.interval(other, number, "retrieval_acc") if has else None}
        return Evidence(number, plan, rung, self.interval(rung, number, "kl"),
                        self.interval(rung, number, "top1_agreement"),
                        self.interval(rung, number, "retrieval_acc") if retrieval else None,
                        self.original_retrieval(rung, number) if retrieval else None, others=others)


def gather_evidence(study: optuna.Study, ladder: Ladder, pick_rung: str | None, front, reference: dict | None) -> list[Evidence]:
    """The evidence of every candidate a best file may name: the trials measured at `pick_rung` (confirmed on
    text the search never scored), else the proxy front at the proxy (one block: intervals marked n=1); with
    their serving measured against all-softmax (speed.py) where it was, else the cost model's prediction
    against all-softmax's (`reference`: its predicted serving, pipeline.reference_serving)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    records = serving_records(study)
    if pick_rung in ladder.rungs and ladder.measured(pick_rung):
        out = [ladder.evidence(n, trials[n].user_attrs[PLAN_ATTR], pick_rung) for n in ladder.measured(pick_rung)]
    else:
        out = [_proxy_evidence(t, study.user_attrs.get(ORIGINAL_ATTR)) for t in front]
    speed = ladder.speed
    for e in out:
        attrs = trials[e.number].user_attrs
        if reference:
            e.predicted_serving = {m: _over(attrs.get(SERVED_ATTRS[m]), reference.get(SERVED_ATTRS[m])) for m in METRICS}
            e.predicted = _over(ladder.cost.get(e.number), speed.cost(reference[speed.column]))  # a share of its cost
            e.concurrency = (attrs.get("concurrency"), reference.get("concurrency"))
            e.kv_share = _over(attrs.get("kv_bytes"), reference.get("kv_bytes"))
        record = records.get(e.number)
        if record is not None:
            e.serving = {m: Interval.of_rounds(round_ratios(record, m)) for m in METRICS
                         if any(r == r for r in round_ratios(record, m))}
            e.predicted_serving = {m: v for m, v in record["predicted"].items() if v is not None}
            e.speed = Interval.of_rounds([speed.share(r) for r in round_ratios(record, speed.key)])
            ratio = record["predicted"].get(speed.key)
            e.predicted = speed.share(ratio) if ratio else None
            e.concurrency = (record["rounds"][0]["concurrency"], record["reference_rounds"][0]["concurrency"])
    return out


# serving metric -> the trial user attr of its predicted value (driver.SearchRun.predicted_attrs)
SERVED_ATTRS = {"ttft": "ttft_s", "tpot": "tpot_s", "throughput": "throughput_tok_s", "latency": "latency_s"}


def _over(a, b) -> float | None:
    return a / b if a is not None and b else None


def _proxy_evidence(trial, original: dict | None) -> Evidence:
    """A front trial's evidence at the proxy: one block, its facts."""
    metrics = proxy_metrics(trial)

    def one(value: float) -> Interval:
        return Interval(value, value, value, 1)

    retrieval = found = None
    if "retrieval_acc" in metrics and original and original.get("facts"):
        facts = int(original["facts"])
        retrieval = Interval.of_facts(round(metrics["retrieval_acc"] * facts), facts)
        found = Interval.of_facts(round(original["metrics"]["retrieval_acc"] * facts), facts)
    return Evidence(trial.number, trial.user_attrs[PLAN_ATTR], PROXY, one(metrics.get("kl", math.nan)),
                    one(metrics.get("top1_agreement", math.nan)), retrieval, found)


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
    rows, scored, served = [], lm_eval_scores(study), serving_records(study)
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name, "plan": t.user_attrs.get(PLAN_ATTR, ""),
               "plan_id": t.user_attrs.get("plan_id", ""), "label": t.user_attrs.get(LABEL_ATTR, ""),
               "feasible": t.user_attrs.get(FEASIBLE_ATTR, "")}
        for i, o in enumerate(objectives):
            row[o.name] = t.values[i] if t.values else ""
        if original:
            row.update(kept_by_kind(row["plan"], original))
        for key, value in sorted(t.user_attrs.items()):
            if key.startswith("proxy:") or key in (*PREDICTED_COLUMNS, "eval_seconds", "skipped", "fail_reason"):
                row[key] = value
        row.update({f"lm_eval:{task}": v for task, v in scored.get(t.number, {}).items()})
        row.update(ladder.columns(t.number))
        if t.number in served:  # measured against all-softmax, plans taking turns (speed.py)
            record = served[t.number]
            for metric in METRICS:
                ratios = [r for r in round_ratios(record, metric) if r == r]
                if ratios:
                    measured = Interval.of_rounds(ratios)
                    row.update({f"{metric}_vs_original_measured": measured.value,
                                f"{metric}_vs_original_measured_lo": measured.lo,
                                f"{metric}_vs_original_measured_hi": measured.hi,
                                f"{metric}_vs_original_predicted": record["predicted"].get(metric)})
            row["concurrency_measured"] = record["rounds"][0]["concurrency"]
        row["dominated_at"] = marked.get(t.number, "")
        row["duration_s"] = t.duration.total_seconds() if t.duration else ""
        rows.append(row)
    return rows


# What the cost model predicted per trial (driver.SearchRun.predicted_attrs): trials.csv columns.
PREDICTED_COLUMNS = ("ttft_s", "tpot_s", "throughput_tok_s", "latency_s", "concurrency", "kv_bytes")


def front_trials(study: optuna.Study) -> list:
    """Feasible Pareto-optimal trials (Optuna's best_trials honours set_constraint), fastest first."""
    speed = speed_of_study(study)
    return sorted(study.best_trials, key=lambda t: speed.cost(t.values[1]))


def speed_of_study(study: optuna.Study):
    """The speed metric a study searches (its second objective's name, set by open_study)."""
    from .objectives import SPEEDS

    names = study.metric_names or []
    column = names[1] if len(names) > 1 else "latency_s"
    return next((s for s in SPEEDS.values() if s.column == column), SPEEDS["latency"])


def knee(front, objectives) -> object | None:
    """The front point farthest from the line between its two extremes (objectives scaled to [0, 1])."""
    if len(front) < 3:
        return front[0] if front else None
    speed = speed_of(objectives)
    q = [t.values[0] for t in front]
    lat = [speed.cost(t.values[1]) for t in front]
    sign = 1 if objectives[0].direction == "minimize" else -1

    def norm(values, v):
        lo, hi = min(values), max(values)
        return (v - lo) / (hi - lo) if hi > lo else 0.0

    points = [(norm(lat, speed.cost(t.values[1])), norm([sign * x for x in q], sign * t.values[0])) for t in front]
    (x1, y1), (x2, y2) = points[0], points[-1]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0
    distances = [abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / length for x, y in points]
    return front[max(range(len(front)), key=distances.__getitem__)]


def plan_json(trial, objectives, context: dict, lm_eval: dict | None = None, ladder: Ladder | None = None,
              evidence: Evidence | None = None, floors: Floors | None = None) -> dict:
    """The plan JSON of `trial`: its proxy metrics, its lm-eval scores {task: accuracy} if it has any, every rung
    it was re-measured at with 90% intervals (over blocks; retrieval over facts) from `ladder`, and, for a best
    file, its serving measured against all-softmax and the floors it was checked against (`evidence`, `floors`)."""
    plan = LayerPlan.from_string(trial.user_attrs[PLAN_ATTR])
    metrics = {o.name: {"value": trial.values[i], "fidelity": o.fidelity, "direction": o.direction}
               for i, o in enumerate(objectives)}
    for key, value in trial.user_attrs.items():
        if key.startswith("proxy:"):
            metrics[key.removeprefix("proxy:")] = {"value": value, "fidelity": "proxy"}
    for task, value in (lm_eval or {}).items():
        metrics[f"lm_eval:{task}"] = {"value": value, "fidelity": "lm-eval"}
    for rung in ladder.rungs if ladder is not None else ():
        if trial.number not in ladder.scores[rung]:
            continue
        for name in ladder.scores[rung][trial.number]["metrics"]:
            got = ladder.interval(rung, trial.number, name)
            metrics[f"{rung}:{name}"] = {"value": got.value, "fidelity": rung, "interval90": [got.lo, got.hi],
                                         "samples": got.n}  # blocks, or facts for retrieval
    for metric, measured in (evidence.serving if evidence is not None else {}).items():
        metrics[f"{metric}_vs_original"] = {
            "value": measured.value, "fidelity": "measured", "interval90": [measured.lo, measured.hi],
            "rounds": measured.n, "predicted": evidence.predicted_serving.get(metric),
            "unit": "median over rounds of the plan's value over all-softmax's, each serving the workload at the "
                    "concurrency its cache allows"}
    if evidence is not None and evidence.concurrency:
        metrics["concurrency"] = {"value": evidence.concurrency[0], "original": evidence.concurrency[1],
                                  "fidelity": "cost-model", "unit": "sequences served at once"}
    extra = {}
    if floors is not None:
        extra["floors"] = {"fidelity": evidence.fidelity if evidence else None, "top1_agreement_low": floors.agreement,
                           "retrieval_share_low": floors.retrieval_share, "ceilings": dict(floors.ceilings),
                           "note": floors.note}
    if context.get("made_with"):  # every setting the numbers were made with: the file alone rebuilds them
        extra["made_with"] = context["made_with"]
    return plan.to_json(model=context["model"], settings=context["settings"], bank_id=context["bank_id"],
                        metrics=metrics, workload=context["workload"], **extra,
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
    speed = speed_of(objectives)
    log_axis = objectives[0].direction == "minimize"  # KL-like: orders of magnitude apart; accuracies are not
    done = [r for r in rows if r["state"] == "COMPLETE"]

    def cost(r):
        return speed.cost(r[lat])

    def x_of(r):  # the speed-up: all-softmax's cost over the plan's (throughput: its multiple)
        return reference / cost(r) if reference else r[lat]

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
    front = sorted((r for r in done if r["number"] in front_numbers), key=cost)
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
        measured = sorted((r for r in done if key in r), key=cost)
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
    x_title = (f"{speed.label}: speed-up over all-softmax (predicted, cost model)" if reference
               else f"{lat} (predicted, cost model)")
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_type="log" if log_axis else "linear",
                      yaxis_title=f"{q} ({objectives[0].direction}; proxy, or the metric named in the legend"
                                  + (f"; 0 drawn at {LOG_FLOOR:g})" if log_axis else ")"),
                      template="plotly_white")
    return fig


def front_table(front, objectives, ladder: Ladder, scored: dict, marked: dict, original: str = "") -> str:
    """The proxy front as a markdown table, with lm-eval scores and each rung's quality and retrieval (90%
    intervals); with `original` (see original_attention), a first row shows the original model's layers."""
    tasks = sorted({task for scores in scored.values() for task in scores})
    rung_cols = [(rung, metric) for rung in ladder.rungs
                 for metric in (objectives[0].name if any(objectives[0].name in m for m in ladder.measured(rung).values())
                                else "kl", "retrieval_acc")
                 if any(metric in m for m in ladder.measured(rung).values())]
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
            measured = ladder.scores[rung].get(t.number)
            cells.append(ladder.interval(rung, t.number, metric).text(4) if measured and metric in measured["metrics"]
                         else "")
        lines.append(f"| {t.number} | {t.user_attrs.get(LABEL_ATTR)} | `{t.user_attrs.get(PLAN_ATTR)}` | "
                     f"{t.values[0]:.4f} | {t.values[1]:.3f} | {t.user_attrs.get('kv_bytes', '')} | "
                     + "".join(f"{c} | " for c in cells) + f"{marked.get(t.number, '')} |")
    return "\n".join(lines)


def export_command(context: dict, run_dir: Path):
    """name -> the command that exports best/<name>.json as a model folder: the file carries every setting it
    was made with (`made_with`), so it is all the command names."""
    return lambda name: f"layerboost export plan={run_dir / 'best' / f'{name}.json'}"


def write_report(study: optuna.Study, objectives, run_dir: Path, context: dict, rungs=(), pick_rung: str | None = None,
                 floors: Floors = Floors(agreement=0.0, retrieval_share=None)) -> str:
    """Write every report file into `run_dir`; returns the printed report: the answer (best files, their
    evidence), then the proxy front. `rungs`: the fidelity rungs' names, lowest first (rungs the study holds
    beyond them come after); picks are judged at `pick_rung` against `floors` (picks.py)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ladder = Ladder(study, objectives, rungs)
    original = original_attention(context.get("layer_kinds"))
    rows = trial_rows(study, objectives, ladder, original)
    write_csv(run_dir / "trials.csv", rows)
    front = front_trials(study)
    numbers = {t.number for t in front}
    write_csv(run_dir / "pareto.csv", [r for r in rows if r["number"] in numbers])
    speed = speed_of(objectives)
    reference = context.get("reference")  # all-softmax's predicted serving (pipeline.reference_serving)
    reference_cost = speed.cost(reference[speed.column]) if reference else None
    fig = pareto_figure(rows, objectives, numbers, f"{context['model']['name']}: {context['study']}", ladder,
                        reference_cost)
    with atomic_path(run_dir / "pareto.html") as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)

    evidence = gather_evidence(study, ladder, pick_rung, front, reference)
    knee_trial = knee(front, objectives)
    picks = pick(evidence, floors, speed, knee=knee_trial.number if knee_trial is not None else None)
    _write_best_files(run_dir / "best", picks, study, objectives, context, ladder, floors)
    write_json(run_dir / "answer.json", answer_json(picks, floors, speed))  # what summary.md opens with, as data

    fidelity = evidence[0].fidelity if evidence else PROXY
    originals = [e.original_retrieval for e in evidence if e.original_retrieval is not None]
    answer = "\n".join([
        "## What to ship", "",
        floors_line(floors, fidelity, originals[0] if originals else None)
        + f" Speed ({speed.label}): each plan and all-softmax serve the workload, taking turns, each at the "
          "concurrency its cache allows"
        + (", judged on the pessimistic end of the 90% interval of its median per-round ratio." if any(e.speed for e in evidence)
           else " (predicted: not measured)."),
        "", answer_table(picks, floors, speed, export_command(context, run_dir)), "",
        "A best file carries the model, data, workload, transfer and option settings it was measured with: "
        "`layerboost export|heal|bench|eval plan=<file>` need nothing else (an override contradicting the file "
        "is refused).", ""]
        + (["Candidates below the floors (not offered): "
            + "; ".join(f"trial {n} ({reason})" for n, reason in sorted(picks.below.items()))] if picks.below else [])
        + ([hint] if (hint := ceiling_hint(picks)) else []))
    marked = ladder.dominated()
    front_part = "\n".join(["## Pareto front (proxy)", "",
                            front_table(front, objectives, ladder, lm_eval_scores(study), marked, original)])
    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    dominated = [f"{n} (at {rung})" for n, rung in sorted(marked.items()) if n in numbers]
    run = [f"- model: {context['model']['name']} ({context['model']['num_layers']} layers, "
           f"fingerprint {context['model']['fingerprint']}), bank {context['bank_id']}",
           f"- workload: {workload_line(context['workload'])}" + (f"; all-softmax predicted: {served_line(reference)}"
                                                                   if reference else ""),
           ranking_line(ladder, objectives[0].name),
           (f"- original attention per layer: `{original}` (G global, w sliding window; a plan's `S` keeps "
            f"each layer's own; `softmax_global` / `softmax_local` in trials.csv count what a plan kept)"
            if original else ""),
           f"- storage: `{context['storage']}` (open with `optuna-dashboard {context['storage']}`)",
           "- trials: " + ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v),
           waiting_note(study),
           f"- fidelities: {', '.join([PROXY, *ladder.rungs])}"
           + (f"; proxy-front plans dominated at a higher fidelity: {', '.join(dominated)}" if dominated else ""),
           ("- this run's stages: " + "; ".join(stage_text(k, v, (context.get("work") or {}).get(k))
                                                for k, v in context["stages"].items())
            if context.get("stages") else ""),
           *(f"- not searched: {note}" for note in context.get("not_searched") or ())]
    summary = [f"# Search {context['study']}", "", answer, "", "## Run", "", *(line for line in run if line), "",
               front_part, ""]
    write_text(run_dir / "summary.md", "\n".join(summary))
    return f"{answer}\n\n{front_part}"


def ceiling_hint(picks) -> str:
    """With no plan offered, the override that would offer the candidates only a ceiling held back ('' if none):
    on a CPU with AMX a 512-token prompt's `linear` prefill costs more than softmax's, so the default TTFT
    ceiling is all that stands between a default run and its fastest candidates (README)."""
    held = picks.held_by_ceilings
    if picks.chosen or not held:
        return ""
    metrics = sorted({m for over in held.values() for m in over})
    trials = ", ".join(str(n) for n in sorted(held))
    lifts = " ".join(f"`objective.ceilings.{m}=null`" for m in metrics)
    return (f"Only a ceiling ({', '.join(metrics)}) held back trial(s) {trials}: {lifts} offers them, trading that "
            "metric for speed.")


def workload_line(workload: dict) -> str:
    """The workload in words: requests, how many at once, the memory budget."""
    w = dict(workload)
    if w.get("memory_gib") is not None:
        memory = f", as many at once as {w['memory_gib']:g} GiB holds beside the weights (at most {w['batch']})"
    elif w.get("memory_sequences") is not None:
        memory = (f", as many at once as a memory holding the weights and {w['memory_sequences']} of the original's "
                  f"sequences holds (at most {w['batch']})")
    else:
        memory = f", {w['batch']} at once"
    return f"requests of {w['prefill']} prompt + {w['decode']} output tokens{memory}"


def served_line(reference: dict) -> str:
    """All-softmax's predicted serving in words."""
    parts = [f"TTFT {reference['ttft_s']:.3f} s"]
    if reference.get("tpot_s") is not None:
        parts += [f"TPOT {reference['tpot_s'] * 1e3:.1f} ms at {reference['concurrency']} sequences",
                  f"{reference['throughput_tok_s']:.1f} output tokens/s"]
    parts.append(f"request latency {reference['latency_s']:.2f} s")
    return ", ".join(parts)


def stage_text(name: str, seconds: float, work: dict | None) -> str:
    """One stage: its wall seconds and, where counted, the forward passes and tokens it ran (what carries over to
    a slower machine: seconds do not)."""
    if not work:
        return f"{name} {seconds:.0f} s"
    return f"{name} {seconds:.0f} s ({work['forwards']} forwards, {work['tokens']:,} tokens)"


def ranking_line(ladder: Ladder, quality: str) -> str:
    """How far the proxy's ranking holds at the confirmation rungs: Spearman's rho between the proxy's quality and
    each rung's over the trials measured at both (the proxy runs on shorter or fewer blocks)."""
    from scipy.stats import spearmanr

    parts = []
    for rung in ladder.rungs:
        measured = ladder.measured(rung)
        pairs = [(ladder.proxy[n], ladder.quality_of(m)) for n, m in measured.items()
                 if ladder.proxy.get(n) is not None and ladder.quality_of(m) is not None]
        if len(pairs) >= 3 and len({a for a, _ in pairs}) > 1 and len({b for _, b in pairs}) > 1:
            rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
            parts.append(f"{rung} rho {rho:.2f} over {len(pairs)} plans")
    return f"- proxy ranking ({quality}) against the higher fidelities: " + ", ".join(parts) if parts else ""


def waiting_note(study: optuna.Study) -> str:
    """A line naming the plans still queued (WAITING) and why, or "" when none is: only seeds beyond the budget
    stay queued (surrogate proposals never exceed the budget's free slots, re-queued plans go first)."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not waiting:
        return ""
    labels = ", ".join(f"#{t.number} {t.user_attrs.get(LABEL_ATTR, '?')}" for t in waiting[:6])
    more = f" and {len(waiting) - 6} more" if len(waiting) > 6 else ""
    return (f"- queued, not evaluated: {len(waiting)} plan(s) ({labels}{more}); the budget was reached first. A rerun "
            f"with a larger `budget` evaluates them before any new proposal")


def _write_best_files(best_dir: Path, picks, study, objectives, context: dict, ladder: Ladder, floors: Floors) -> None:
    """best/<name>.json for every pick, and no other file: a file an earlier report wrote for a plan that no
    longer keeps the floors (other floors, more evidence) is removed, never left to be shipped."""
    best_dir.mkdir(parents=True, exist_ok=True)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    scored = lm_eval_scores(study)
    for name, e in picks.chosen.items():
        write_json(best_dir / f"{name}.json", plan_json(trials[e.number], objectives, context, scored.get(e.number),
                                                        ladder, e, floors))
    for stale in best_dir.glob("*.json"):
        if stale.stem not in picks.chosen:
            stale.unlink()
