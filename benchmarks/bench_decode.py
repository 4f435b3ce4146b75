"""Cached decode speed and KV memory of all-linear and half-softmax plans as ratios to all-softmax.

    python benchmarks/bench_decode.py [--plans LABEL=SSLN... ...] [--no-bank] [--runs 1] [key=value ...]
                                      e.g. bench.contexts=[4096] bench.batches=[1,8] model=qwen2.5-0.5b device=cuda

Contexts, batches, decode steps and the memory budget are `layerboost bench`'s settings (`bench.contexts`,
`bench.batches`, `bench.decode_tokens`, `bench.memory_budget_gb`); model, device, dtype and option settings the
CLI's. All three plans (all-softmax, all-linear, half-softmax = S/L alternating) are measured in one run, taking
turns inside each (context, batch), plus any `--plans` (e.g. a search's best plans, `keep-90=LSSS...`): one
prefill of `context` tokens into a HybridCache, then timed one-token decode steps (see layerboost_core/bench.py
for what every number means). Also, per plan, the largest batch whose KV cache fits the memory budget next to
the weights and the decode throughput there (measured when that batch was measured, else estimated from the
measured step times).

The cached bank is used when present (never trained here); speed does not depend on the bank's weights,
so `--no-bank` skips looking for it.
"""
from __future__ import annotations

import torch

from harness import Script, run
from layerboost.settings import bench_settings, workbench_settings
from layerboost_core.bench import BASELINE, measure_plans, ratio_rows
from layerboost_core.plan import LayerPlan
from layerboost_core.transfer import bank_id, bank_path, read_bank
from layerboost_core.workbench import open_workbench

MEASURED = ("prefill_s", "decode_tok_s", "kv_bytes", "peak_bytes", "max_batch", "max_batch_tok_s")
RATIOS = ("decode_speedup", "kv_ratio", "prefill_speedup", "max_batch_ratio", "max_batch_throughput_ratio")


def load_cached_bank(bench) -> str:
    """Load the cached bank into the switcher if there is one; says what was used."""
    key = bank_id(bench.info, bench.splits.hashes["train"], bench.settings.options, bench.settings.transfer)
    bank = read_bank(bank_path(bench.info["name"], key), key)
    if bank is None:
        return "no cached bank: linear layers keep their initial weights (speed does not depend on them)"
    bench.switcher.load_bank(bank)
    return f"bank {key}"


def where(row: dict) -> str:
    return f"{row['plan_label']} @ ctx {row['context']} batch {row['batch']}"


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="decode", title="Cached decode and KV memory", runs=True)
    script.parser.add_argument("--no-bank", action="store_true", help="do not look for the cached bank")
    script.parser.add_argument("--plans", nargs="+", default=[], metavar="LABEL=PLAN",
                               help="more compact plans to measure beside the three, each as label=plan")
    args, cfg = script.parse(argv)
    settings = bench_settings(cfg)
    bench = open_workbench(workbench_settings(cfg), with_bank=False)
    bank = "bank not used (--no-bank)" if args.no_bank else load_cached_bank(bench)
    n = bench.switcher.num_layers
    plans = {BASELINE: LayerPlan.uniform("softmax", n), "all-linear": LayerPlan.uniform("linear", n),
             "half-softmax": LayerPlan(tuple("softmax" if i % 2 == 0 else "linear" for i in range(n)))}
    for item in args.plans:
        label, _, text = item.rpartition("=")
        plans[label or text] = LayerPlan.from_string(text)
    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    print(f"{bench.info['name']} ({n} layers) on {bench.loaded.device}, {bench.loaded.dtype}, "
          f"threads={torch.get_num_threads()}; {bench.settings.options}; {bank}; {settings}")
    for index in range(args.runs):
        rows = measure_plans(bench.switcher, plans, settings)
        ratios = ratio_rows(rows)
        results.add_run({"measured": {where(r): {k: r[k] for k in MEASURED} for r in rows},
                         "ratio_to_all_softmax": {where(q): {k: q[k] for k in RATIOS} for q in ratios},
                         "rows": rows})
        print(f"run {index + 1}/{args.runs} done")

    last = results.runs[-1]["rows"]
    results.table(
        f"Measured (median over {args.runs} run(s)); KV and peak in MiB",
        ["plan", "context", "batch", "prefill s", "decode tok/s", "KV MiB", "peak MiB", f"max batch in "
         f"{settings.memory_budget_gb:g} GiB", "tok/s at max batch", "throughput at max batch"],
        [[r["plan_label"], r["context"], r["batch"], results.median(f"measured / {where(r)} / prefill_s"),
          results.median(f"measured / {where(r)} / decode_tok_s"), r["kv_bytes"] / 2**20, r["peak_bytes"] / 2**20,
          r["max_batch"], results.median(f"measured / {where(r)} / max_batch_tok_s"), r["throughput_source"]]
         for r in last],
        note="peak: " + "; ".join(sorted({r["peak_source"] for r in last})))
    ratio_rows_last = ratio_rows(last)
    results.table(
        f"Ratio to all-softmax at the same context and batch (median over {args.runs} run(s))",
        ["plan", "context", "batch", "decode speed-up", "KV ratio", "prefill speed-up", "max batch ratio",
         "throughput at max batch ratio"],
        [[q["plan_label"], q["context"], q["batch"],
          *(results.median(f"ratio_to_all_softmax / {where(q)} / {k}") for k in RATIOS)] for q in ratio_rows_last])
    context, batch = max(settings.contexts), min(settings.batches)
    key = f"ratio_to_all_softmax / all-linear @ ctx {context} batch {batch}"
    results.headline(f"all-linear decode speed-up over all-softmax, {context:,}-token context, batch {batch}",
                     round(results.median(f"{key} / decode_speedup"), 2), "x")
    results.headline(f"all-linear KV bytes over all-softmax's, {context:,}-token context",
                     round(results.median(f"{key} / kv_ratio"), 3), "x")
    results.note(f"{bench.info['name']} ({n} layers), {bench.settings.options}; {bank}; plans: "
                 + ", ".join(f"{label} {plan}" for label, plan in plans.items()))
    results.write()


if __name__ == "__main__":
    run(main)
