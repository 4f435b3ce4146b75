"""Healing on the default model (SmolLM2-135M): how much of a half-replaced plan's KL gap distillation closes.

Run:  python benchmarks/bench_heal.py [config overrides]
      e.g. python benchmarks/bench_heal.py                      (default heal.tokens, ~10 min on 2 CPU cores)
           python benchmarks/bench_heal.py plan=SLSN...          (a given plan instead of the chosen one)

The plan: with a cached sensitivity table for this bank and held-out set (`layerboost sensitivity`), the
half of the layers least sensitive to a swap, each with its better option (lower single-swap KL); without
one, every other layer replaced, alternating `linear` and `none`. Prints the held-out KL against training
tokens, the before/after table, the KL gap closed (target >= 30%), tokens/s and wall time. The hybrid folder
goes to <output_dir>/bench_heal/<plan id>/ (running it again reuses a finished folder: delete it to remeasure).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from layerboost_core.cache_dir import cache_root
from layerboost.config import compose
from layerboost.settings import heal_settings, workbench_settings
from layerboost_core.logs import quiet_libraries
from layerboost_core.heal import format_curve, heal_to_folder
from layerboost_core.plan import LayerPlan, load_plan
from layerboost_core.sensitivity import sensitivity_key
from layerboost_core.workbench import open_workbench

TARGET = 0.30


def cached_sensitivity(bench) -> list[dict] | None:
    """The sensitivity rows `layerboost sensitivity` cached for this bank and held-out set, if any."""
    key = sensitivity_key((bench.bank.id, bench.splits.hashes["heldout"]))
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


def main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    started = time.perf_counter()
    cfg = compose(argv)
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    if cfg.plan:
        plan, why = load_plan(str(cfg.plan), bench.info), f"given: {cfg.plan}"
    else:
        plan, why = choose_plan(bench)
    if not cfg.heal.out:
        cfg.heal.out = str(Path(cfg.output_dir) / "bench_heal" / plan.id)
    print(f"model {bench.info['name']}, plan {plan} ({why}): " +
          ", ".join(f"{o} x{plan.count(o)}" for o in sorted(set(plan.layers))))
    print(f"heal: {int(cfg.heal.tokens)} tokens, batch {cfg.heal.batch_size} x seq {cfg.heal.seq_len or cfg.data.seq_len or cfg.workload.prefill}, "
          f"lr {cfg.heal.lr}, lora {'on' if cfg.heal.lora.enabled else 'off'}; held-out "
          f"{tuple(bench.splits.heldout.shape)} blocks")
    out, result = heal_to_folder(bench, plan, heal_settings(cfg), Path(cfg.heal.out), source=str(plan))
    metrics = json.loads((Path(out) / "heal_metrics.json").read_text())
    before, after = metrics["before"]["kl"], metrics["after"]["kl"]
    closed = 1 - after / before if before > 0 else float("nan")
    if result is None:  # a finished folder was reused: show its curve
        print(format_curve(metrics["curve"]))
    print(f"\nKL gap closed: {closed * 100:.1f}% ({before:.4f} -> {after:.4f} nats/token; target >= "
          f"{TARGET * 100:.0f}%: {'met' if closed >= TARGET else 'NOT met'})")
    print(f"training {metrics['tokens']} tokens at {metrics['tokens_per_second']:.0f} tok/s "
          f"({metrics['train_seconds']:.0f} s in optimiser steps); wall time of this script "
          f"{time.perf_counter() - started:.0f} s; folder {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
