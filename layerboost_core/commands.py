"""The verbs of the `layerboost` CLI, each a thin call into the library."""
from __future__ import annotations

import statistics
import time

from .cli import verb
from .workbench import attach_bank, open_workbench


@verb("transfer")
def transfer_command(cfg) -> None:
    """Train (or reuse) the bank of `linear` replacements and report its held-out quality."""
    started = time.perf_counter()
    bench = open_workbench(cfg, with_bank=True)
    meta = bench.bank.meta
    trained = meta.get("training", {}).get("linear", {}).get("seconds")
    print(f"bank {bench.bank.id}: {meta['path']}")
    print(f"model {bench.info['name']} ({bench.info['num_layers']} layers, fingerprint {bench.info['fingerprint']})")
    if trained is not None:
        print(f"trained in {trained:.0f} s" + ("" if time.perf_counter() - started > trained else " (earlier run)"))
    else:
        print("reused from cache")
    from .transfer import transfer_errors

    errors = transfer_errors(bench.switcher, bench.splits.heldout)
    print(f"held-out relative MSE of linear attention output: median {statistics.median(errors):.4f}, "
          f"max {max(errors):.4f} (layer {errors.index(max(errors))})")


@verb("sensitivity")
def sensitivity_command(cfg) -> None:
    """Every (layer, option) swapped alone, scored against the original; CSV + heatmap; cached."""
    from pathlib import Path

    from .metrics import ProxyEvaluator
    from .sensitivity import cached_sensitivity, sensitivity_heatmap, write_sensitivity_csv

    bench = open_workbench(cfg, with_bank=True)
    started = time.perf_counter()
    proxy = ProxyEvaluator(bench.model, bench.splits.heldout)
    rows = cached_sensitivity(bench.switcher, proxy, (bench.bank.id, bench.splits.hashes["heldout"]),
                              progress=bool(cfg.progress))
    out = Path(cfg.output_dir) / "sensitivity" / f"{bench.info['name'].replace('/', '--')}-{bench.bank.id}"
    write_sensitivity_csv(rows, out / "sensitivity.csv")
    sensitivity_heatmap(rows, out / "sensitivity.html", title=f"{bench.info['name']}: KL to the original, one layer swapped")
    by = {(r["layer"], r["option"]): r for r in rows}
    options = sorted({r["option"] for r in rows})
    print("layer  " + "  ".join(f"{o + ' KL':>12}" for o in options))
    for layer in range(bench.switcher.num_layers):
        print(f"{layer:5d}  " + "  ".join(f"{by[(layer, o)]['kl']:12.4f}" for o in options))
    print(f"{len(rows)} swaps in {time.perf_counter() - started:.0f} s (including cache hits); written to {out}")


@verb("eval")
def eval_command(cfg) -> None:
    """Proxy metrics and lm-eval task scores of one plan (`plan=<file.json>` or `plan=SSLN...`)."""
    import json
    from pathlib import Path

    from .cache_dir import write_json
    from .errors import UserError
    from .metrics import PROXY_METRICS, ProxyEvaluator
    from .hybrid_folder import hybrid_workbench, original_reference, plan_is_folder
    from .plan import load_plan

    if not cfg.plan:
        raise UserError("plan: missing; pass plan=<plan.json>, plan=<compact string such as SSLN...> "
                        "or plan=<hybrid folder from layerboost heal>")
    if plan_is_folder(cfg.plan):  # a healed hybrid: its own weights, scored against the original model
        bench, plan = hybrid_workbench(cfg, cfg.plan)
        proxy = original_reference(cfg, bench, bench.splits.heldout)
        bank_id, label = bench.info["bank_id"], f"{plan.id}-healed"
    else:
        bench = open_workbench(cfg, with_bank=False)
        plan = load_plan(str(cfg.plan), bench.info)  # refuse a foreign plan before any training
        attach_bank(bench)
        proxy = ProxyEvaluator(bench.model, bench.splits.heldout)
        bank_id, label = bench.bank.id, plan.id
    bench.switcher.apply(plan)
    started = time.perf_counter()
    metrics = {name: {"value": value, "fidelity": "proxy", "direction": PROXY_METRICS.get(name).direction}
               for name, value in proxy.evaluate().items()}
    proxy_seconds = time.perf_counter() - started
    tasks = list(cfg.eval.tasks)
    if tasks:
        from . import lm_eval_tasks

        task_dir = lm_eval_tasks.write_offline_tasks(
            None, bench.splits.documents["heldout"], bench.loaded.tokenizer,
            {"n_examples": int(cfg.eval.n_examples), "passkey_context": int(cfg.eval.passkey_context),
             "seed": int(cfg.seed)})
        scores = lm_eval_tasks.evaluate_tasks(bench.model, bench.loaded.tokenizer, tasks, task_dir,
                                              batch_size=int(cfg.eval.batch_size), limit=cfg.eval.limit)
        metrics.update({f"lm_eval:{task}": {"value": value, "fidelity": "lm-eval", "direction": "maximize"}
                        for task, value in scores.items()})
    bench.switcher.restore()
    settings = bench.switcher.settings if bench.bank is None else dict(cfg.attention)
    record = plan.to_json(model=bench.info, settings=settings, bank_id=bank_id, metrics=metrics,
                          origin={"evaluated_by": "layerboost eval", "source": str(cfg.plan)})
    out = Path(cfg.output_dir) / "eval" / f"{label}.json"
    write_json(out, json.loads(json.dumps(record, default=str)))
    print(f"plan {plan} (id {plan.id}): " + ", ".join(f"{o} x{plan.count(o)}" for o in sorted(set(plan.layers))))
    for name, m in metrics.items():
        print(f"  {name:28s} {m['value']:.4f}  ({m['fidelity']}, {m['direction']})")
    print(f"proxy evaluation {proxy_seconds:.1f} s; written to {out}")


@verb("bench")
def bench_command(cfg) -> None:
    """Measured prefill latency, decode speed, KV bytes, memory and max batch of `plan=` beside all-softmax."""
    from .bench import run_bench

    run_bench(cfg)


@verb("heal")
def heal_command(cfg) -> None:
    """Distil `plan=` from the original model and save a hybrid model folder (<output_dir>/healed/<plan id>/)."""
    from .heal import run_heal

    run_heal(cfg)
