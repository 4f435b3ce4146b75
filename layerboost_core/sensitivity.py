"""Single-swap sensitivity: every (layer, option) swapped alone, scored with the proxy metrics.

The `none` column is the LayerBoost paper's own importance score (attention replaced by identity). Results
are cached by a hash of (bank id, held-out data, metrics) and written as sensitivity.csv.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from tqdm.auto import tqdm

from .cache_dir import atomic_path, cache_root, content_hash
from .metrics import METRICS_VERSION, ProxyEvaluator
from .patch import PlanSwitcher
from .plan import LayerPlan

log = logging.getLogger(__name__)


def single_swap_plan(num_layers: int, layer: int, option: str) -> LayerPlan:
    names = ["softmax"] * num_layers
    names[layer] = option
    return LayerPlan(tuple(names))


def sensitivity_table(switcher: PlanSwitcher, evaluator: ProxyEvaluator, options=("linear", "none"),
                      progress: bool = True) -> list[dict]:
    """Rows of (layer, option, metrics...) for every single swap; the switcher is left at all-softmax."""
    rows = []
    jobs = [(layer, option) for layer in range(switcher.num_layers) for option in options]
    try:
        for layer, option in tqdm(jobs, desc="sensitivity", unit="swap", disable=not progress):
            switcher.apply(single_swap_plan(switcher.num_layers, layer, option))
            rows.append({"layer": layer, "option": option, **evaluator.evaluate()})
    finally:
        switcher.restore()
    return rows


def cached_sensitivity(switcher: PlanSwitcher, evaluator: ProxyEvaluator, key_parts: tuple,
                       options=("linear", "none"), progress: bool = True) -> list[dict]:
    """`sensitivity_table` in this process, reused from the cache when scored before."""
    def score_here(jobs):
        results = {}
        try:
            for key, plan in tqdm(jobs.items(), desc="sensitivity", unit="swap", disable=not progress):
                switcher.apply(plan)
                results[key] = {"metrics": evaluator.evaluate()}
        finally:
            switcher.restore()
        return results

    return cached_sensitivity_rows(key_parts, switcher.num_layers, score_here, options)


def sensitivity_key(key_parts: tuple, options=("linear", "none")) -> str:
    """Cache key of a sensitivity table: what it was scored on (bank, held-out set) and how (metrics version)."""
    return content_hash("sensitivity", METRICS_VERSION, *key_parts, list(options))


def cached_sensitivity_rows(key_parts: tuple, num_layers: int, score_plans, options=("linear", "none")) -> list[dict]:
    """Sensitivity rows computed by `score_plans({key: plan}) -> {key: result}` (e.g. a runner pool), cached."""
    key = sensitivity_key(key_parts, options)
    path = cache_root() / "sensitivity" / f"{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            log.warning("sensitivity cache %s is unreadable; recomputing", path)
    jobs = {(layer, option): single_swap_plan(num_layers, layer, option)
            for layer in range(num_layers) for option in options}
    log.info("sensitivity: scoring %d single-layer swaps", len(jobs))
    results = score_plans(jobs)
    rows = []
    for (layer, option), result in sorted(results.items()):
        if "error" in result:
            raise RuntimeError(f"sensitivity of layer {layer} / {option} failed: {result['error']}")
        rows.append({"layer": layer, "option": option, **result["metrics"]})
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"key_parts": [str(p) for p in key_parts], "rows": rows}))
    return rows


def sensitivity_heatmap(rows: list[dict], path: Path, metric: str = "kl", title: str = "") -> None:
    """Layer x option heatmaps (plotly HTML) of sensitivity rows: `metric` and, where the rows have retrieval
    metrics, the retrieval each swap keeps beside it (the layers retrieval lives in, which KL does not show)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    options = sorted({r["option"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    panels = [(metric, "Viridis", f"{metric} (lower: the swap costs less)")]
    if all(r.get("retrieval_acc") is not None for r in rows):
        panels.append(("retrieval_acc", "RdYlGn", "retrieval_acc: planted facts still found (higher is better)"))
    fig = make_subplots(rows=len(panels), cols=1, subplot_titles=[p[2] for p in panels], vertical_spacing=0.18)
    for index, (name, scale, _) in enumerate(panels, start=1):
        value = {(r["layer"], r["option"]): r[name] for r in rows}
        z = [[value[(layer, option)] for layer in layers] for option in options]
        fig.add_trace(go.Heatmap(z=z, x=layers, y=options, colorscale=scale,
                                 colorbar=dict(title=name, len=1 / len(panels), y=1 - (index - 0.5) / len(panels)),
                                 hovertemplate=f"layer %{{x}}, %{{y}}: {name} %{{z:.4f}}<extra></extra>"),
                      row=index, col=1)
        fig.update_xaxes(title_text="layer", row=index, col=1)
        fig.update_yaxes(title_text="option swapped in alone", row=index, col=1)
    fig.update_layout(title=title or f"single-layer swap sensitivity ({metric})", template="plotly_white",
                      height=320 * len(panels))
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)
