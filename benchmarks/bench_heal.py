"""Healing on the default model (SmolLM2-135M): how much of a half-replaced plan's KL gap distillation closes.

    python benchmarks/bench_heal.py [key=value ...]
      e.g. python benchmarks/bench_heal.py                      (default heal.tokens, ~10 min on 2 CPU cores)
           python benchmarks/bench_heal.py plan=SLSN...          (a given plan instead of the chosen one)

The plan: with a cached sensitivity table for this bank, held-out set and proxy settings (`layerboost
sensitivity`), the half of the layers least sensitive to a swap, each with its better option (lower single-swap
KL); without one, every other layer replaced, alternating `linear` and `none`. Measures the held-out KL against
training tokens, the before/after metrics, the KL gap closed (target >= 30%), tokens/s and wall time. The
hybrid folder goes to <output_dir>/bench_heal/<plan id>/ (running it again reuses a finished folder: delete it
to remeasure).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from harness import Script, run
from layerboost.settings import heal_settings, workbench_settings
from layerboost_core.cache_dir import cache_root
from layerboost_core.heal import format_curve, heal_to_folder
from layerboost_core.plan import LayerPlan, load_plan
from layerboost_core.sensitivity import sensitivity_key
from layerboost_core.workbench import open_workbench

TARGET = 0.30


def cached_sensitivity(bench) -> list[dict] | None:
    """The sensitivity rows `layerboost sensitivity` cached for this bank, held-out set and proxy, if any."""
    key = sensitivity_key(bench.scoring_key())
    path = cache_root() / "sensitivity" / f"{key}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else None


def choose_plan(bench) -> tuple[LayerPlan, str]:
    """Half the layers replaced: the least sensitive ones when a sensitivity table is cached."""
    n = bench.switcher.num_layers
    rows = cached_sensitivity(bench)
    if rows is None:
        names = ["softmax" if i % 2 == 0 else ("linear" if i % 4 == 1 else "none") for i in range(n)]
        return LayerPlan(tuple(names)), "no cached sensitivity table: every other layer, alternating linear/none"
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        if r["layer"] not in best or r["kl"] < best[r["layer"]][0]:
            best[r["layer"]] = (r["kl"], r["option"])
    chosen = sorted(best, key=lambda layer: best[layer][0])[: n // 2]
    names = [best[i][1] if i in chosen else "softmax" for i in range(n)]
    return LayerPlan(tuple(names)), f"the {n // 2} least sensitive layers (cached sensitivity table), best option each"


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="heal", title="Healing")
    _, cfg = script.parse(argv)
    started = time.perf_counter()
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    if cfg.plan:
        plan, why = load_plan(str(cfg.plan), bench.info), f"given: {cfg.plan}"
    else:
        plan, why = choose_plan(bench)
    out_dir = Path(cfg.heal.out or Path(cfg.output_dir) / "bench_heal" / plan.id)
    settings = heal_settings(cfg)
    print(f"model {bench.info['name']}, plan {plan} ({why}): " +
          ", ".join(f"{o} x{plan.count(o)}" for o in sorted(set(plan.layers))))
    print(f"heal: {settings}; held-out {tuple(bench.splits.heldout.shape)} blocks")
    out, result = heal_to_folder(bench, plan, settings, out_dir, source=str(plan))
    metrics = json.loads((Path(out) / "heal_metrics.json").read_text())
    before, after = metrics["before"]["kl"], metrics["after"]["kl"]
    closed = 1 - after / before if before > 0 else float("nan")
    if result is None:  # a finished folder was reused: show its curve
        print(format_curve(metrics["curve"]))
    wall = time.perf_counter() - started

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.add_run({"kl_gap_closed": closed, "kl_before": before, "kl_after": after,
                     "tokens": metrics["tokens"], "tokens_per_second": metrics["tokens_per_second"],
                     "train_seconds": metrics["train_seconds"], "wall_seconds": wall,
                     "folder_reused": result is None, "plan": str(plan), "why": why,
                     "before": metrics["before"], "after": metrics["after"], "curve": metrics["curve"]})
    curve = metrics["curve"]
    results.table("Held-out metrics against training tokens", ["tokens", *(p["tokens"] for p in curve)],
                  [[name, *(p.get(key) for p in curve)] for name, key in (("held-out KL", "kl"),
                                                                          ("top-1 agreement", "top1_agreement"))])
    results.table("Before and after", ["metric", "before", "after"],
                  [[k, metrics["before"][k], metrics["after"].get(k)] for k in metrics["before"]])
    results.headline("KL gap to the original closed by healing (default budget)", round(closed * 100, 1), "%")
    results.note(f"plan {plan} ({why}); KL gap closed {closed * 100:.1f}% ({before:.4f} -> {after:.4f} nats/token; "
                 f"target >= {TARGET * 100:.0f}%: {'met' if closed >= TARGET else 'NOT met'})")
    results.note(f"training {metrics['tokens']} tokens at {metrics['tokens_per_second']:.0f} tok/s "
                 f"({metrics['train_seconds']:.0f} s in optimiser steps); wall time of the script {wall:.0f} s"
                 + ("; the finished folder was reused (nothing trained in this run)" if result is None else "")
                 + f"; folder {out}")
    results.write()


if __name__ == "__main__":
    run(main)
