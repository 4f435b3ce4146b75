"""How quality measurements move with context length: the bank and the single-layer sensitivities at several
held-out block lengths, side by side in one run.

    python benchmarks/bench_context.py [overrides...] --lengths 512 2048 4096 [--bank-only]

(overrides first: `--lengths` takes every number after it)

For each length L (held-out blocks of L tokens mixed over every built-in source, `data.blocks.heldout` of
them): the bank's median per-layer relative MSE of the `linear` attention output, the KL of the all-`linear`
plan, and the single-swap sensitivity table (every layer to `linear` and to `none`; cached like the search's
own). Then the Spearman rank correlation of the per-layer sensitivities between every pair of lengths, per
option: how far a ranking made at one context can be trusted at another.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from scipy.stats import spearmanr

from layerboost.config import compose
from layerboost.settings import workbench_settings
from layerboost_core.logs import quiet_libraries
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity
from layerboost_core.transfer import transfer_errors
from layerboost_core.workbench import attach_bank, open_workbench

OPTIONS = ("linear", "none")


def measure_at(base, length: int, progress: bool, sensitivity: bool = True) -> dict:
    """Bank quality, all-linear KL and the sensitivity table on held-out blocks of `length` tokens."""
    data = dataclasses.replace(base.data, heldout_seq_len=length, mix_sources=True)
    bench = attach_bank(open_workbench(dataclasses.replace(base, data=data)))
    started = time.perf_counter()
    errors = transfer_errors(bench.switcher, bench.splits.heldout)
    proxy = bench.proxy_evaluator()
    bench.switcher.apply(LayerPlan.uniform("linear", bench.switcher.num_layers))
    all_linear = proxy.evaluate(["kl"])["kl"]
    bench.switcher.restore()
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(), OPTIONS, progress=progress) \
        if sensitivity else []
    return {"length": length, "blocks": int(bench.splits.heldout.shape[0]), "mse": statistics.median(errors),
            "all_linear_kl": all_linear, "seconds": time.perf_counter() - started,
            "kl": {(r["layer"], r["option"]): r["kl"] for r in rows}, "layers": bench.switcher.num_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--bank-only", action="store_true",
                        help="only the bank's error and the all-linear KL (no sensitivity tables)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_libraries()
    base = workbench_settings(compose(args.overrides))
    results = [measure_at(base, length, base.progress, not args.bank_only) for length in args.lengths]
    print(f"\n{'held-out tokens':>16} {'blocks':>6} {'bank median rel. MSE':>21} {'all-linear KL':>14} {'seconds':>8}")
    for r in results:
        print(f"{r['length']:>16} {r['blocks']:>6} {r['mse']:>21.4f} {r['all_linear_kl']:>14.4f} {r['seconds']:>8.0f}")
    if args.bank_only:
        return
    print("\nSpearman of single-layer sensitivities between lengths (per option)")
    for option in OPTIONS:
        for i, a in enumerate(results):
            for b in results[i + 1:]:
                layers = range(a["layers"])
                rho = spearmanr([a["kl"][(k, option)] for k in layers], [b["kl"][(k, option)] for k in layers])[0]
                print(f"  {option:7s} {a['length']:>5} vs {b['length']:>5}: {rho:.3f}")
    for option in OPTIONS:
        print(f"\nper-layer KL, {option}: " + " | ".join(
            f"{r['length']}: " + " ".join(f"{r['kl'][(k, option)]:.3g}" for k in range(r["layers"])) for r in results))


if __name__ == "__main__":
    main()
