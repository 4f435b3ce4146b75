"""Quality of the attention-transfer bank on held-out text (the default model: SmolLM2).

    python benchmarks/bench_bank.py [key=value ...]      e.g. data.blocks.heldout=8

Per-layer relative MSE of the `linear` attention output, untrained feature maps vs the trained bank (median
ratio); for every layer, held-out KL to the original when that layer alone is swapped to `linear` versus to
`none`; and the KL of the all-`linear` plan with and without its linear branch (gate forced to the window, so
only the sliding window + sinks remain).
"""
from __future__ import annotations

import statistics
import time

import torch

from harness import Script, run
from layerboost.settings import workbench_settings
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import sensitivity_table
from layerboost_core.transfer import transfer_errors
from layerboost_core.workbench import open_workbench


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="bank", title="Bank quality")
    _, cfg = script.parse(argv)
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    switcher, heldout = bench.switcher, bench.splits.heldout
    print(f"model {bench.info['name']}, bank {bench.bank.id}, held-out {tuple(heldout.shape)} tokens, "
          f"settings {bench.settings.options['linear']}")

    torch.manual_seed(0)
    untrained = PlanSwitcher(bench.model, bench.settings.options)  # fresh modules: the init before training
    before = transfer_errors(untrained, heldout)
    after = transfer_errors(switcher, heldout)

    evaluator = ProxyEvaluator(bench.model, heldout)
    started = time.perf_counter()
    rows = sensitivity_table(switcher, evaluator, ("linear", "none"), progress=bench.settings.progress)
    sensitivity_seconds = time.perf_counter() - started
    kl = {(r["layer"], r["option"]): r["kl"] for r in rows}
    n = switcher.num_layers
    better = [i for i in range(n) if kl[(i, "linear")] < kl[(i, "none")]]

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

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    mse_ratio = statistics.median(before) / statistics.median(after)
    results.add_run({
        "median_rel_mse_untrained": statistics.median(before), "median_rel_mse_trained": statistics.median(after),
        "median_rel_mse_ratio": mse_ratio, "linear_beats_none_layers": len(better), "layers": n,
        "all_linear_kl": with_branch, "all_linear_kl_branch_zeroed": without_branch, "all_none_kl": all_none,
        "sensitivity_seconds": sensitivity_seconds,
        "rel_mse_untrained": before, "rel_mse_trained": after,
        "single_swap_kl_linear": [kl[(i, "linear")] for i in range(n)],
        "single_swap_kl_none": [kl[(i, "none")] for i in range(n)]})
    results.table("Relative MSE of the linear attention output, median over layers",
                  ["untrained", "trained", "ratio"], [[statistics.median(before), statistics.median(after), mse_ratio]])
    results.table("Single-layer swaps: held-out KL to the original",
                  ["layer", "rel. MSE untrained", "rel. MSE trained", "KL linear", "KL none"],
                  [[i, before[i], after[i], kl[(i, "linear")], kl[(i, "none")]] for i in range(n)],
                  note=f"linear beats none in {len(better)}/{n} layers ({100 * len(better) / n:.0f}%); "
                       f"{sensitivity_seconds:.0f} s for the table")
    results.table("Whole-model plans: held-out KL",
                  ["all-linear", "all-linear, linear branch zeroed", "ratio", "all-none"],
                  [[with_branch, without_branch, without_branch / with_branch, all_none]])
    results.headline("bank: median relative MSE of the linear attention output, untrained / trained",
                     round(mse_ratio, 1), "x")
    results.headline("all-linear held-out KL (bank)", round(with_branch, 4), "nats/token")
    results.note(f"model {bench.info['name']}, bank {bench.bank.id}, held-out {tuple(heldout.shape)} tokens "
                 f"(hash {bench.splits.hashes['heldout']}), linear settings {bench.settings.options['linear']}")
    results.write()


if __name__ == "__main__":
    run(main)
