"""Quality of the attention-transfer bank on SmolLM2, held-out text.

    python benchmarks/bench_bank.py [overrides...]      e.g. data.blocks.heldout=8

Prints: per-layer relative MSE of the `linear` attention output, untrained feature maps vs the trained bank
(median ratio); for every layer, held-out KL to the original when that layer alone is swapped to `linear`
versus to `none`; and the KL of the all-`linear` plan with and without its linear branch (gate forced to
the window, so only the sliding window + sinks remain).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from layerboost.config import compose
from layerboost.settings import workbench_settings
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import sensitivity_table
from layerboost_core.transfer import transfer_errors
from layerboost_core.workbench import open_workbench


def main(overrides: list[str]) -> None:
    cfg = compose(overrides)
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    switcher, heldout = bench.switcher, bench.splits.heldout
    print(f"model {bench.info['name']}, bank {bench.bank.id}, held-out {tuple(heldout.shape)} tokens, "
          f"settings {bench.settings.options['linear']}")

    torch.manual_seed(0)
    untrained = PlanSwitcher(bench.model, bench.settings.options)  # fresh modules: the init before training
    before = transfer_errors(untrained, heldout)
    after = transfer_errors(switcher, heldout)
    ratio = statistics.median(before) / statistics.median(after)
    print("\nrelative MSE of the linear attention output (per layer: untrained -> trained)")
    print("  " + "  ".join(f"{i}:{b:.3f}->{a:.3f}" for i, (b, a) in enumerate(zip(before, after))))
    print(f"  median {statistics.median(before):.4f} -> {statistics.median(after):.4f}: {ratio:.1f}x lower")

    evaluator = ProxyEvaluator(bench.model, heldout)
    started = time.perf_counter()
    rows = sensitivity_table(switcher, evaluator, ("linear", "none"), progress=bool(cfg.progress))
    kl = {(r["layer"], r["option"]): r["kl"] for r in rows}
    n = switcher.num_layers
    better = [i for i in range(n) if kl[(i, "linear")] < kl[(i, "none")]]
    print(f"\nsingle-layer swaps ({time.perf_counter() - started:.0f} s): KL to the original, linear vs none")
    for i in range(n):
        print(f"  layer {i:2d}: linear {kl[(i, 'linear')]:.4f}  none {kl[(i, 'none')]:.4f}")
    print(f"  linear beats none in {len(better)}/{n} layers ({100 * len(better) / n:.0f}%)")

    switcher.apply(LayerPlan.uniform("linear", n))
    with_branch = evaluator.evaluate(["kl"])["kl"]
    gates = [switcher.module(i, "linear").learned.gate_logit for i in range(n)]
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        for g in gates:
            g.fill_(float("inf"))  # sigmoid -> 1: the linear branch gets zero weight
    without_branch = evaluator.evaluate(["kl"])["kl"]
    with torch.no_grad():
        for g, s in zip(gates, saved):
            g.copy_(s)
    switcher.apply(LayerPlan.uniform("none", n))
    all_none = evaluator.evaluate(["kl"])["kl"]
    switcher.restore()
    print(f"\nall-linear KL {with_branch:.4f}; with the linear branch zeroed {without_branch:.4f} "
          f"({without_branch / with_branch:.2f}x); all-none KL {all_none:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
