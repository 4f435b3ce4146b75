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
    """A layer x option heatmap (plotly HTML) of one metric from sensitivity rows."""
    import plotly.graph_objects as go

    options = sorted({r["option"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    value = {(r["layer"], r["option"]): r[metric] for r in rows}
    z = [[value[(layer, option)] for layer in layers] for option in options]
    fig = go.Figure(go.Heatmap(z=z, x=layers, y=options, colorscale="Viridis", colorbar=dict(title=metric),
                               hovertemplate="layer %{x}, %{y}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title or f"single-layer swap sensitivity ({metric})", xaxis_title="layer",
                      yaxis_title="option swapped in alone", template="plotly_white")
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)
