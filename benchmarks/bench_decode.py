"""Cached decode speed and KV memory of all-linear and half-softmax plans as ratios to all-softmax.

    python benchmarks/bench_decode.py [--contexts 4096] [--batches 1,8] [--decode-tokens 32]
                                      [--budget-gb 8] [--no-bank] [--plans LABEL=SSLN... ...]
                                      [overrides...]   e.g. model=qwen2.5-0.5b device=cuda

All three plans (all-softmax, all-linear, half-softmax = S/L alternating) are measured in one run, taking
turns inside each (context, batch), plus any `--plans` (e.g. a search's best plans, `keep-90=LSSS...`): one prefill of `context` tokens into a HybridCache, then timed
one-token decode steps (see layerboost_core/bench.py for what every number means). Also prints, per plan,
the largest batch whose KV cache fits the memory budget next to the weights and the decode throughput
there (measured when that batch was measured, else estimated from the measured step times).

The cached bank is used when present (never trained here); speed does not depend on the bank's weights,
so `--no-bank` skips looking for it.
"""
from __future__ import annotations

import argparse

import torch

from layerboost_core.bench import BASELINE, BenchSettings, format_table, measure_plans, ratio_rows
from layerboost.config import compose
from layerboost.settings import workbench_settings
from layerboost_core.logs import quiet_libraries
from layerboost_core.plan import LayerPlan
from layerboost_core.transfer import bank_id, bank_path, read_bank
from layerboost_core.workbench import open_workbench


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def load_cached_bank(bench) -> str:
    """Load the cached bank into the switcher if there is one; says what was used."""
    key = bank_id(bench.info, bench.splits.hashes["train"], bench.settings.options, bench.settings.transfer)
    bank = read_bank(bank_path(bench.info["name"], key), key)
    if bank is None:
        return "no cached bank: linear layers keep their initial weights (speed does not depend on them)"
    bench.switcher.load_bank(bank)
    return f"bank {key}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=ints, default=(4096,), help="comma-separated, e.g. 1024,4096")
    parser.add_argument("--batches", type=ints, default=(1, 8), help="comma-separated, e.g. 1,8")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="GiB for weights + KV cache")
    parser.add_argument("--no-bank", action="store_true", help="do not look for the cached bank")
    parser.add_argument("--plans", nargs="+", default=[], metavar="LABEL=PLAN",
                        help="more compact plans to measure beside the three, each as label=plan")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model=... device=cuda")
    args = parser.parse_args()
    quiet_libraries()

    cfg = compose(args.overrides)
    bench = open_workbench(workbench_settings(cfg), with_bank=False)
    bank = "bank not used (--no-bank)" if args.no_bank else load_cached_bank(bench)
    n = bench.switcher.num_layers
    plans = {BASELINE: LayerPlan.uniform("softmax", n), "all-linear": LayerPlan.uniform("linear", n),
             "half-softmax": LayerPlan(tuple("softmax" if i % 2 == 0 else "linear" for i in range(n)))}
    for item in args.plans:
        label, _, text = item.rpartition("=")
        plans[label or text] = LayerPlan.from_string(text)
    settings = BenchSettings(args.contexts, args.batches, args.decode_tokens, args.budget_gb, int(cfg.seed))
    linear = cfg.attention.linear
    print(f"{bench.info['name']} ({n} layers) on {bench.loaded.device}, {str(bench.loaded.dtype).replace('torch.', '')}, "
          f"threads={torch.get_num_threads()}; linear window={linear.window} sinks={linear.sinks} "
          f"feature_dim={linear.feature_dim}; {bank}")
    print(f"{args.decode_tokens} timed decode steps after each prefill; budget {args.budget_gb:g} GiB\n")
    rows = measure_plans(bench.switcher, plans, settings)
    print(format_table(rows))
    print("\nsummary (ratio to all-softmax):")
    for q in ratio_rows(rows):
        print(f"  {q['plan_label']:>12}  ctx {q['context']}  batch {q['batch']}:  decode tok/s x{q['decode_speedup']:.2f}"
              f"   KV bytes x{q['kv_ratio']:.3f}")
    seen = set()
    for r in rows:
        key = (r["plan_label"], r["context"])
        if key in seen:
            continue
        seen.add(key)
        print(f"  {r['plan_label']:>12}  ctx {r['context']}: max batch in {args.budget_gb:g} GiB = {r['max_batch']}, "
              f"{r['max_batch_tok_s'] or 0:.1f} tok/s there ({r['throughput_source']})")


if __name__ == "__main__":
    main()
