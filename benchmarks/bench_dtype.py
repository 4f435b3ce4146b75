"""float32 against bfloat16 on this machine: speed, the bank, the proxy's ranking of plans and of layers.

    python benchmarks/bench_dtype.py [overrides...] [--plans SSS... LLL...] [--no-sensitivity]

(overrides first, as for `search.py`, e.g. `data.source=builtin:-news`; `dtype=` is set here, once per
column.) The same settings as the search (held-out blocks at the workload's context), opened once per dtype:
the bank is loaded or trained at that dtype (bank ids differ: the model's fingerprint does), every plan is
scored against the original at the same dtype, and the single-layer sensitivity table is built (cached like
the search's own). Prints, side by side: one all-softmax forward, bank training time and held-out error, each
plan's KL and top-1 agreement, and the Spearman rank correlation between the two dtypes of the plans' KL and of
the per-layer sensitivities, per option. What decides whether a search at bfloat16 finds the float32 front.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch
from scipy.stats import spearmanr

from layerboost.config import compose
from layerboost.settings import search_settings
from layerboost_core.logs import quiet_libraries
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity
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


def measure(base, dtype: str, plans: list[str] | None, sensitivity: bool) -> dict:
    settings = dataclasses.replace(base, model=dataclasses.replace(base.model, dtype=dtype))
    bench = attach_bank(open_workbench(settings))
    layers = bench.switcher.num_layers
    plans = plans or default_plans(layers)
    block = bench.splits.heldout[:1, :-1]
    with torch.inference_mode():
        bench.model(input_ids=block[:, :128], use_cache=False)  # warm-up
        started = time.perf_counter()
        bench.model(input_ids=block, use_cache=False)
        forward = time.perf_counter() - started
    proxy = bench.proxy_evaluator()
    scores = {}
    for text in plans:
        bench.switcher.apply(LayerPlan.from_string(text))
        scores[text] = proxy.evaluate(["kl", "top1_agreement"])
        bench.switcher.restore()
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(), OPTIONS,
                              progress=settings.progress) if sensitivity else []
    return {"dtype": dtype, "forward": forward, "bank_seconds": bench.bank.meta["training"]["linear"]["seconds"],
            "bank_mse": statistics.median(transfer_errors(bench.switcher, bench.splits.heldout)),
            "plans": scores, "layers": layers, "tokens": int(bench.splits.heldout.shape[1]),
            "sensitivity": {(r["layer"], r["option"]): r["kl"] for r in rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", nargs="+", default=None, help="plans to score (default: 14 fixed mixes)")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the single-layer tables")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_libraries()
    base = search_settings(compose(args.overrides)).workbench
    fp, bf = (measure(base, dtype, args.plans, not args.no_sensitivity) for dtype in DTYPES)
    print(f"\none held-out block of {fp['tokens']} tokens, torch threads {torch.get_num_threads()}")
    print(f"{'':28s} {'float32':>10} {'bfloat16':>10} {'ratio':>7}")
    for label, key in (("all-softmax forward (s)", "forward"), ("bank training (s)", "bank_seconds"),
                       ("bank median rel. MSE", "bank_mse")):
        print(f"{label:28s} {fp[key]:>10.4g} {bf[key]:>10.4g} {bf[key] / fp[key]:>7.3f}")
    print(f"\n{'plan':{fp['layers']}s}  KL fp32 / bf16   top-1 agreement fp32 / bf16")
    for text in fp["plans"]:
        a, b = fp["plans"][text], bf["plans"][text]
        print(f"{text}  {a['kl']:.4f} / {b['kl']:.4f}   {a['top1_agreement']:.4f} / {b['top1_agreement']:.4f}")
    for metric in ("kl", "top1_agreement"):
        rho = spearmanr([fp["plans"][t][metric] for t in fp["plans"]], [bf["plans"][t][metric] for t in fp["plans"]])[0]
        print(f"Spearman over plans, {metric}: {rho:.3f}")
    if fp["sensitivity"]:
        for option in OPTIONS:
            layers = range(fp["layers"])
            a = [fp["sensitivity"][(k, option)] for k in layers]
            b = [bf["sensitivity"][(k, option)] for k in layers]
            print(f"Spearman of single-layer sensitivities, {option}: {spearmanr(a, b)[0]:.3f} "
                  f"(median KL {statistics.median(a):.4g} / {statistics.median(b):.4g})")


if __name__ == "__main__":
    main()
