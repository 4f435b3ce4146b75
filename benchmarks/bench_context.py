"""How quality measurements move with context length: the bank and the single-layer sensitivities at several
held-out block lengths, side by side in one run.

    python benchmarks/bench_context.py [--lengths 512,2048,4096] [--bank-only] [key=value ...]

For each length L (held-out blocks of L tokens mixed over every built-in source, `data.blocks.heldout` of
them): the bank's median per-layer relative MSE of the `linear` attention output, the KL of the all-`linear`
plan, and the single-swap sensitivity table (every layer to `linear` and to `none`; cached like the search's
own). Then the Spearman rank correlation of the per-layer sensitivities between every pair of lengths, per
option: how far a ranking made at one context can be trusted at another. With `--bank-only` the results file
is `context_bank` (the bank's error and the all-linear KL only), else `context`.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

from scipy.stats import spearmanr

from harness import Script, ints, run
from layerboost.settings import workbench_settings
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity
from layerboost_core.transfer import transfer_errors
from layerboost_core.workbench import attach_bank, open_workbench

OPTIONS = ("linear", "none")


def measure_at(base, length: int, sensitivity: bool = True) -> tuple[dict, object]:
    """Bank quality, all-linear KL and the sensitivity table on held-out blocks of `length` tokens."""
    data = dataclasses.replace(base.data, heldout_seq_len=length, mix_sources=True)
    bench = attach_bank(open_workbench(dataclasses.replace(base, data=data)))
    started = time.perf_counter()
    errors = transfer_errors(bench.switcher, bench.splits.heldout)
    proxy = bench.proxy_evaluator()
    bench.switcher.apply(LayerPlan.uniform("linear", bench.switcher.num_layers))
    all_linear = proxy.evaluate(["kl"])["kl"]
    bench.switcher.restore()
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(), OPTIONS, progress=base.progress) \
        if sensitivity else []
    kl = {o: [r["kl"] for r in sorted(rows, key=lambda r: r["layer"]) if r["option"] == o] for o in OPTIONS}
    return {"blocks": int(bench.splits.heldout.shape[0]), "bank_median_rel_mse": statistics.median(errors),
            "all_linear_kl": all_linear, "seconds": time.perf_counter() - started,
            **({"single_swap_kl": kl} if sensitivity else {})}, bench


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="context", title="Sensitivity across context lengths")
    script.parser.add_argument("--lengths", type=ints, default=(512, 2048, 4096), help="comma-separated")
    script.parser.add_argument("--bank-only", action="store_true",
                               help="only the bank's error and the all-linear KL (no sensitivity tables)")
    args, cfg = script.parse(argv)
    base = workbench_settings(cfg)
    measured, bench = {}, None
    for length in args.lengths:
        measured[str(length)], bench = measure_at(base, length, not args.bank_only)
    results = script.results("context_bank" if args.bank_only else None,
                             "The bank at several contexts" if args.bank_only else None)
    results.describe(bench.loaded.device, bench.loaded.dtype)
    run_values = {"by_length": measured}
    results.table("Per held-out length", ["held-out tokens", "blocks", "bank median rel. MSE", "all-linear KL",
                                          "seconds"],
                  [[int(k), m["blocks"], m["bank_median_rel_mse"], m["all_linear_kl"], round(m["seconds"])]
                   for k, m in measured.items()])
    if not args.bank_only:
        rho = {}
        for option in OPTIONS:
            keys = list(measured)
            for i, a in enumerate(keys):
                for b in keys[i + 1:]:
                    rho[f"{option} {a} vs {b}"] = float(spearmanr(measured[a]["single_swap_kl"][option],
                                                                  measured[b]["single_swap_kl"][option])[0])
        run_values["spearman"] = rho
        results.table("Spearman of single-layer sensitivities between lengths (per option)",
                      ["option", "lengths", "Spearman"],
                      [[k.split(" ", 1)[0], k.split(" ", 1)[1], v] for k, v in rho.items()])
        for option in OPTIONS:
            layers = len(next(iter(measured.values()))["single_swap_kl"][option])
            results.table(f"Per-layer single-swap KL, {option}", ["layer", *measured],
                          [[k, *(m["single_swap_kl"][option][k] for m in measured.values())] for k in range(layers)])
        first, last = list(measured)[0], list(measured)[-1]
        results.headline(f"Spearman of `linear` layer sensitivities, {int(first):,} vs {int(last):,} tokens",
                         round(rho[f"linear {first} vs {last}"], 3))
    results.add_run(run_values)
    results.note(f"model {bench.info['name']}, {bench.settings.options}; held-out blocks mixed over every source")
    results.write()


if __name__ == "__main__":
    run(main)
