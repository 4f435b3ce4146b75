"""`layerboost bench`."""
from __future__ import annotations

from . import adopts_plan_file, shows


@adopts_plan_file
@shows("plan", "bench.contexts", "bench.batches", "bench.decode_tokens", "bench.memory_budget_gb", "device", "dtype")
def bench(cfg) -> None:
    """Measured prefill latency, decode speed, KV bytes, memory and largest batch of `plan=` beside
    all-softmax, taking turns in one run: a table, bench.csv and bench.html; then both serving the workload
    (the plan file's own, or workload.*): TTFT, TPOT and throughput at the concurrency each cache allows
    (serving.csv)."""
    from ..settings import bench_settings, plan_spec, workbench_settings

    from pathlib import Path

    from layerboost_core.bench import BASELINE, format_table, measure_plans, write_html
    from layerboost_core.hybrid_folder import plan_is_folder
    from layerboost_core.models import dtype_name
    from layerboost_core.plan import LayerPlan, load_plan
    from layerboost_core.tables import write_csv
    from layerboost_core.workbench import (attach_bank, attach_head_choices, needs_bank, open_hybrid_workbench,
                                           open_workbench)

    spec = plan_spec(cfg, " or plan=<hybrid folder>")
    settings = bench_settings(cfg)
    workbench = workbench_settings(cfg)
    if plan_is_folder(spec):  # a hybrid folder: its own weights and plan; all-softmax is its base
        bench_, plan = open_hybrid_workbench(workbench, spec, with_splits=False)
    else:
        bench_ = open_workbench(workbench)
        plan = load_plan(spec, bench_.info)
        attach_head_choices(bench_, plan.layers)
        # Speed does not depend on the bank's weights; bench.bank=true only for outputs that look right.
        if bool(cfg.bench.bank) and needs_bank(plan.layers):
            attach_bank(bench_)
    n = bench_.switcher.num_layers
    plans = {BASELINE: LayerPlan.uniform("softmax", n)}
    if plan != plans[BASELINE]:
        plans["plan"] = plan
    rows = measure_plans(bench_.switcher, plans, settings, progress=workbench.progress)
    out = Path(cfg.output_dir) / "bench" / f"{bench_.info['name'].replace('/', '--')}-{plan.id}"
    write_csv(out / "bench.csv", rows)
    serving = serve_workload(bench_, plans, workbench.workload)
    if serving:
        write_csv(out / "serving.csv", serving)
    dtype = dtype_name(bench_.loaded.dtype)
    write_html(rows, out / "bench.html",
               f"{bench_.info['name']}: plan {plan} vs all-softmax ({bench_.loaded.device.type}, {dtype})")
    print(f"model {bench_.info['name']} on {bench_.loaded.device} ({dtype}), plan {plan}, "
          f"{settings.decode_tokens} decode steps, budget {settings.memory_budget_gb:g} GiB")
    print(format_table(rows))
    if serving:
        print(f"\nserving the workload ({workbench.workload}), plans taking turns, each at the concurrency its cache "
              "allows (median of 3 rounds):")
        for row in serving:
            print("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"written to {out}")


def serve_workload(bench, plans: dict, workload, rounds: int = 3) -> list[dict]:
    """Each plan serving `workload` (layerboost_core.serving), taking turns with all-softmax: one row per plan with
    its concurrency, TTFT, TPOT and throughput, and their ratios to all-softmax's. [] without output tokens."""
    import statistics

    from layerboost_core.bench import BASELINE
    from layerboost_core.serving import serve_in_turns
    from layerboost_surrogates.cost_model import sequences_at_once

    if not workload.decode:
        return []
    concurrency = sequences_at_once(bench.switcher.model, bench.switcher.settings, workload, plans)
    served = serve_in_turns(bench.switcher, plans, workload, concurrency, rounds)
    rows = []
    for label, runs in served.items():
        row = {"plan_label": label, "plan": str(plans[label]), "concurrency": concurrency[label]}
        for metric in ("ttft", "tpot", "throughput"):
            row[metric] = statistics.median(s.metric(metric) for s in runs)
            row[f"{metric}_vs_{BASELINE}"] = statistics.median(
                mine.metric(metric) / theirs.metric(metric) for mine, theirs in zip(runs, served[BASELINE]))
        rows.append(row)
    return rows
