"""`layerboost eval` (the module is not called eval: that is a Python builtin)."""
from __future__ import annotations

from . import adopts_plan_file, shows

PLAN_FORMS = " or plan=<hybrid folder from layerboost heal or export>"


@adopts_plan_file
@shows("plan", "eval.tasks", "eval.n_examples", "data.blocks.heldout", "output_dir")
def evaluate(cfg) -> None:
    """Proxy metrics and lm-eval task scores of one plan (`plan=<file.json>`, `plan=SSLN...` or a hybrid
    folder). The bank is loaded (or trained) only when the plan has a `linear` layer."""
    from ..settings import eval_settings, plan_spec, workbench_settings

    import json
    import time
    from pathlib import Path

    from layerboost_core import lm_eval_tasks
    from layerboost_core.cache_dir import write_json
    from layerboost_core.hybrid_folder import plan_is_folder
    from layerboost_core.metrics import PROXY_METRICS
    from layerboost_core.plan import load_plan
    from layerboost_core.workbench import (attach_bank, attach_head_choices, bank_id_or_none, needs_bank,
                                           open_hybrid_workbench, open_workbench, original_reference)

    spec = plan_spec(cfg, PLAN_FORMS)
    settings, tasks = workbench_settings(cfg), eval_settings(cfg)
    if plan_is_folder(spec):  # a hybrid folder: its own weights, scored against the original model
        bench, plan = open_hybrid_workbench(settings, spec)
        proxy = original_reference(bench)
        bank_id, label = bench.info["bank_id"], f"{plan.id}-folder"
    else:
        bench = open_workbench(settings)
        plan = load_plan(spec, bench.info)  # refuse a foreign plan before any training
        attach_head_choices(bench, plan.layers)
        if needs_bank(plan.layers):
            attach_bank(bench)
        proxy = bench.proxy_evaluator()
        bank_id, label = bank_id_or_none(bench), plan.id
    bench.switcher.apply(plan)
    started = time.perf_counter()
    metrics = {name: {"value": value, "fidelity": "proxy", "direction": PROXY_METRICS.get(name).direction}
               for name, value in proxy.evaluate().items()}
    proxy_seconds = time.perf_counter() - started
    if tasks.tasks:
        task_dir = lm_eval_tasks.write_offline_tasks(None, bench.splits.documents["heldout"], bench.loaded.tokenizer,
                                                     tasks.task_settings(settings.workload.prefill))
        scores = lm_eval_tasks.evaluate_tasks(bench.model, bench.loaded.tokenizer, list(tasks.tasks), task_dir,
                                              batch_size=tasks.batch_size, limit=tasks.limit)
        metrics.update({f"lm_eval:{task}": {"value": value, "fidelity": "lm-eval", "direction": "maximize"}
                        for task, value in scores.items()})
    bench.switcher.restore()
    record = plan.to_json(model=bench.info, settings=bench.switcher.settings, bank_id=bank_id, metrics=metrics,
                          origin={"evaluated_by": "layerboost eval", "source": spec})
    out = Path(cfg.output_dir) / "eval" / f"{label}.json"
    write_json(out, json.loads(json.dumps(record, default=str)))
    print(f"plan {plan} (id {plan.id}): " + ", ".join(f"{o} x{plan.count(o)}" for o in sorted(set(plan.layers))))
    for name, m in metrics.items():
        print(f"  {name:28s} {m['value']:.4f}  ({m['fidelity']}, {m['direction']})")
    print(f"proxy evaluation {proxy_seconds:.1f} s; written to {out}")
