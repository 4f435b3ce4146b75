"""What retrieval costs in cache, and so in throughput: plans from all-softmax to all-linear confirmed on the
search's own confirmation text, beside the cache they keep and the throughput they serve.

    python benchmarks/bench_frontier.py [--plans NAME=PLAN,...] [--best FILE,...] [--rounds 3] [key=value ...]

The search's model, bank, head choices and workload (`key=value` overrides as `python search.py` takes them).
Every plan (a ladder of hand plans by default: all-softmax, softmax kept where single swaps lose retrieval and
`mixed1` elsewhere, all-`mixed1`, `mixed1` and `linear` alternating, all-`linear`; plus `--plans` and the plans
of `--best` files) is measured on the confirmation rung (`fidelity.pick_rung`: its blocks at the prompt length,
facts answered by generation through the hybrid cache), priced by the serving cost model (cache per sequence,
sequences at once under the memory budget, throughput), and with `--rounds` > 0 served against all-softmax in
turns (median of per-round ratios). The table is the frontier a search walks: how much cache a plan must keep
to keep 90% of the original's facts, and what that leaves of the throughput.
"""
from __future__ import annotations

import json
import statistics

from harness import Script, run

HAND = {"all-mixed1": "1" * 30, "mixed1, linear alternating": "1L" * 15, "all-linear": "L" * 30}


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="frontier", title="Retrieval against cache and throughput")
    script.parser.add_argument("--plans", default="", help="comma-separated NAME=PLAN (compact strings)")
    script.parser.add_argument("--best", default="", help="comma-separated best files (plan JSON)")
    script.parser.add_argument("--rounds", type=int, default=3, help="serving rounds against all-softmax (0: none)")
    args, cfg = script.parse(argv)
    from layerboost.settings import search_settings
    from layerboost_core.metrics import ProxyEvaluator
    from layerboost_core.plan import LayerPlan
    from layerboost_core.serving import serve_in_turns
    from layerboost_core.workbench import attach_bank
    from layerboost_search.fidelity import binomial_interval, rung_blocks
    from layerboost_core.sensitivity import cached_sensitivity
    from layerboost_search.picks import Interval, keeps_retrieval
    from layerboost_search.pipeline import prepare, sensitivity_options
    from layerboost_search.seeds import retrieval_critical

    settings = search_settings(cfg)
    prepared = prepare(settings)
    bench, cost = prepared.bench, prepared.cost
    attach_bank(bench)
    w = prepared.settings.workbench
    n = bench.switcher.num_layers
    plans = {"all-softmax": "S" * n}
    proxy = bench.proxy_evaluator()  # the critical layers: single swaps that lose the floor at the proxy
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(), progress=w.progress,
                              options=sensitivity_options(prepared.space))  # the search's, when it ran
    floor = settings.objective.retrieval_floor * proxy.original["retrieval_acc"]
    critical = {layer for layer, _ in retrieval_critical(rows, floor, proxy.blocks.num_facts)}
    plans["softmax where a swap loses retrieval, mixed1 elsewhere"] = "".join(
        "S" if i in critical else "1" for i in range(n))
    plans.update({name: text[:n] for name, text in HAND.items()})
    for item in filter(None, args.plans.split(",")):
        name, _, text = item.partition("=")
        plans[name] = text or name
    for path in filter(None, args.best.split(",")):
        plans[path.rsplit("/", 1)[-1].removesuffix(".json")] = json.loads(open(path).read())["plan"]
    layer_plans = {name: LayerPlan.from_string(text).check_layers(n) for name, text in plans.items()}

    rung = settings.fidelity.pick_rung
    rungs = list(settings.fidelity.rungs)
    blocks = rung_blocks(bench.loaded.tokenizer, rungs, rung, w.data, w.workload.prefill, w.proxy.fact_seed)
    generate = next(r for r in rungs if r.name == rung).generate
    evaluator = ProxyEvaluator(bench.model, blocks, batch_size=1, reference_top_k=w.proxy.reference_top_k,
                               generate=generate)
    original = evaluator.original_per_fact["retrieval_acc"]
    reference = cost.predict(layer_plans["all-softmax"])
    measured = {}
    for name, plan in layer_plans.items():
        bench.switcher.apply(plan)
        m = evaluator.measure()
        found = m.per_fact["retrieval_acc"]
        predicted = cost.predict(plan)
        measured[name] = {"plan": str(plan), "found": int(sum(found)), "facts": len(found),
                          "kept_share": sum(found) / sum(original), "found_low": binomial_interval(int(sum(found)), len(found))[0],
                          "keeps_floor": keeps_retrieval(Interval.of_facts(int(sum(found)), len(found)),
                                                         Interval.of_facts(int(sum(original)), len(original)),
                                                         settings.objective.retrieval_floor),
                          "kl": m.metrics["kl"], "agreement": m.metrics["top1_agreement"],
                          "cache_share": cost.kv_bytes(plan) / cost.kv_bytes(layer_plans["all-softmax"]),
                          "concurrency": predicted.concurrency, "throughput_predicted": predicted.throughput / reference.throughput,
                          "ttft_predicted": predicted.ttft_s / reference.ttft_s}
        print(name, measured[name], flush=True)
    bench.switcher.restore()
    if args.rounds > 0:
        at_once = {name: cost.concurrency(plan) for name, plan in layer_plans.items()}
        served = serve_in_turns(bench.switcher, layer_plans, settings.workload, at_once, args.rounds)
        for name in layer_plans:
            measured[name]["throughput_measured"] = statistics.median(
                a.throughput / b.throughput for a, b in zip(served[name], served["all-softmax"]))

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    bar = settings.objective.retrieval_floor * sum(original) / len(original)
    results.add_run({"plans": measured, "original_found": int(sum(original)), "facts": len(original),
                     "critical_layers": sorted(critical), "retrieval_bar": bar})
    results.table(f"Plans on the `{rung}` rung ({len(original)} facts at {w.workload.prefill} tokens, answered by "
                  f"{'generation' if generate else 'one forward'}; the original finds {int(sum(original))}), priced "
                  f"and served at the workload; keeps the floor: found at the low end of its 90% interval >= "
                  f"{bar:.3f} ({settings.objective.retrieval_floor:.0%} of the original's)",
                  ["plan", "layers", "facts found", "of the original's", "keeps the floor", "cache per sequence",
                   "sequences at once", "throughput predicted", "throughput measured", "TTFT predicted", "KL",
                   "top-1 agreement"],
                  [[name, m["plan"], f"{m['found']}/{m['facts']}", round(m["kept_share"], 3),
                    "yes" if m["keeps_floor"] else "no",
                    round(m["cache_share"], 3), m["concurrency"], round(m["throughput_predicted"], 3),
                    round(m["throughput_measured"], 3) if "throughput_measured" in m else None,
                    round(m["ttft_predicted"], 3), round(m["kl"], 4), round(m["agreement"], 3)]
                   for name, m in measured.items()])
    keeping = [m for m in measured.values() if m["keeps_floor"]]
    cheapest = min((m for m in keeping if m["plan"] != "S" * n), key=lambda m: m["cache_share"], default=None)
    if cheapest is not None:
        results.headline(f"least cache a plan of this ladder keeps while keeping the retrieval floor, "
                         f"{w.workload.prefill}-token prompts", round(cheapest["cache_share"], 3), "x")
    results.write()


if __name__ == "__main__":
    run(main)
