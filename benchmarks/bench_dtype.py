"""float32 against bfloat16 on this machine: speed, the bank, the proxy's ranking of plans and of layers.

    python benchmarks/bench_dtype.py [--plans SSS... LLL...] [--no-sensitivity] [key=value ...]
                                     e.g. data.source=builtin:-news

The same settings as the search (`key=value` overrides as for `search.py`; held-out blocks at the workload's
context; `dtype=` is set here, once per column), opened once per dtype: the bank is loaded or trained at that
dtype (bank ids differ: the model's fingerprint does), every plan is scored against the original at the same
dtype, and the single-layer sensitivity table is built (cached like the search's own). Side by side: one
all-softmax forward (after a warm-up forward), bank training time and held-out error, each plan's KL and top-1
agreement, and the Spearman rank correlation between the two dtypes of the plans' KL and of the per-layer
sensitivities, per option. What decides whether a search at bfloat16 finds the float32 front.
"""
from __future__ import annotations

import dataclasses
import random
import statistics

import torch
from scipy.stats import spearmanr

from harness import Script, run
from layerboost.settings import search_settings
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity
from layerboost_core.timing import time_rounds
from layerboost_core.transfer import transfer_errors
from layerboost_core.workbench import attach_bank, open_workbench

DTYPES = ("float32", "bfloat16")
OPTIONS = ("linear", "none")


def default_plans(layers: int, count: int = 12, seed: int = 0) -> list[str]:
    """All-softmax, all-linear, and random mixes from nearly softmax to mostly replaced (fixed seed)."""
    rng = random.Random(seed)
    plans = ["S" * layers, "L" * layers]
    for i in range(count):
        share = 0.05 + 0.5 * i / max(count - 1, 1)  # share of layers replaced
        plans.append("".join(("L" if rng.random() < 0.7 else "N") if rng.random() < share else "S"
                             for _ in range(layers)))
    return plans


def measure(base, dtype: str, plans: list[str] | None, sensitivity: bool) -> tuple[dict, object]:
    settings = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=dtype))
    bench = attach_bank(open_workbench(settings))
    layers = bench.switcher.num_layers
    plans = plans or default_plans(layers)
    block = bench.splits.heldout[:1, :-1]
    with torch.inference_mode():
        forward = time_rounds({"forward": lambda: bench.model(input_ids=block, use_cache=False)}, rounds=1,
                              warmup=1, device=bench.loaded.device)["forward"][0]
    proxy = bench.proxy_evaluator()
    scores = {}
    for text in plans:
        bench.switcher.apply(LayerPlan.from_string(text))
        scores[text] = proxy.evaluate(["kl", "top1_agreement"])
        bench.switcher.restore()
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(), OPTIONS,
                              progress=settings.progress) if sensitivity else []
    return {"forward_s": forward, "bank_seconds": bench.bank.meta["training"]["linear"]["seconds"],
            "bank_median_rel_mse": statistics.median(transfer_errors(bench.switcher, bench.splits.heldout)),
            "tokens": int(bench.splits.heldout.shape[1]), "plans": list(scores),
            "kl": [scores[t]["kl"] for t in scores], "top1_agreement": [scores[t]["top1_agreement"] for t in scores],
            "single_swap_kl": {o: [r["kl"] for r in sorted(rows, key=lambda r: r["layer"]) if r["option"] == o]
                               for o in OPTIONS} if rows else {}}, bench.loaded.device


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="dtype", title="Float32 or bfloat16 on this machine")
    script.parser.add_argument("--plans", nargs="+", default=None, help="plans to score (default: 14 fixed mixes)")
    script.parser.add_argument("--no-sensitivity", action="store_true", help="skip the single-layer tables")
    args, cfg = script.parse(argv)
    base = search_settings(cfg).workbench
    (fp, device), (bf, _) = (measure(base, dtype, args.plans, not args.no_sensitivity) for dtype in DTYPES)
    spearman = {f"plans {metric}": float(spearmanr(fp[metric], bf[metric])[0]) for metric in ("kl", "top1_agreement")}
    for option in fp["single_swap_kl"]:
        spearman[f"single-layer sensitivity {option}"] = float(
            spearmanr(fp["single_swap_kl"][option], bf["single_swap_kl"][option])[0])
    results = script.results()
    results.describe(device, " and ".join(DTYPES))
    results.add_run({"float32": fp, "bfloat16": bf, "spearman": spearman})
    results.table(f"One held-out block of {fp['tokens']} tokens, torch threads {torch.get_num_threads()}",
                  ["", "float32", "bfloat16", "ratio"],
                  [[label, fp[key], bf[key], bf[key] / fp[key]] for label, key in (
                      ("all-softmax forward (s)", "forward_s"), ("bank training (s)", "bank_seconds"),
                      ("bank median rel. MSE", "bank_median_rel_mse"))])
    results.table("Plans scored against the original at the same dtype",
                  ["plan", "KL fp32", "KL bf16", "top-1 agreement fp32", "top-1 agreement bf16"],
                  [[text, fp["kl"][i], bf["kl"][i], fp["top1_agreement"][i], bf["top1_agreement"][i]]
                   for i, text in enumerate(fp["plans"])])
    medians = {o: (statistics.median(fp["single_swap_kl"][o]), statistics.median(bf["single_swap_kl"][o]))
               for o in fp["single_swap_kl"]}
    results.table("Spearman rank correlation between the dtypes", ["of", "Spearman"],
                  [[k, v] for k, v in spearman.items()],
                  note="; ".join(f"median single-swap KL, {o}: {a:.4g} (fp32) / {b:.4g} (bf16)"
                                 for o, (a, b) in medians.items()) or None)
    results.headline("all-softmax forward time, bfloat16 over float32", round(bf["forward_s"] / fp["forward_s"], 2), "x")
    results.headline("Spearman of the plans' KL, float32 vs bfloat16", round(spearman["plans kl"], 3))
    results.write()


if __name__ == "__main__":
    run(main)
