"""The per-head `mixed` options against layer-level options only: what each option costs, and what a search
finds with and without them.

    python benchmarks/bench_mixed.py [--costs-only] [--rounds 3] [key=value ...]

1. Per-option cost at the workload: the serving cost model's pieces (every option's uniform plan timed in turns,
   over `none`): the prefill of one prompt and a decode step at each concurrency it prices, per layer, and the
   cache bytes one layer keeps per sequence. A `mixed<k>` option the model cannot run (fewer than k + 1 KV heads)
   is said, not timed.
2. Unless `--costs-only`: two floor-on searches with the given overrides, one over softmax/linear/none and one
   with mixed1/mixed2 too (`space.prune_dominated=false` in both, so the options themselves are compared),
   each confirming its picks as the default run does. The fastest plan keeping the retrieval and quality floors
   in each (its answer.json, offered as a best file or not) and all-softmax then serve the workload in turns
   (`--rounds` rounds, each at the concurrency its cache allows): throughput, TTFT and TPOT against all-softmax,
   beside the search's own measurement and prediction, and cache bytes.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from harness import Script, run
from layerboost.settings import search_settings
from layerboost_core.inference.mixed_attention import MIXED_OPTIONS
from layerboost_core.plan import LayerPlan
from layerboost_core.serving import serve_in_turns
from layerboost_search.pipeline import prepare, run_search

LAYER_ONLY = ["softmax", "linear", "none"]


def fastest_keeping_floors(run_dir: Path) -> tuple[str, dict] | None:
    """(plan, evidence) of the fastest plan that keeps the floors, as the search's answer.json names it (offered
    as a best file or not: a plan no speed target fits is still the fastest one keeping retrieval), if any."""
    fastest = json.loads((run_dir / "answer.json").read_text())["fastest_keeping_floors"]
    if fastest is None:
        return None
    measured = fastest.get("serving_measured") or {}
    return fastest["plan"], {"trial": fastest["trial"], "fidelity": fastest["fidelity"],
                             "throughput_measured": (measured.get("throughput") or {}).get("value"),
                             "throughput_predicted": (fastest.get("serving_predicted") or {}).get("throughput"),
                             "kl": fastest["kl"]["value"], "retrieval_acc": (fastest["retrieval_acc"] or {}).get("value")}


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="mixed", title="Per-head mixed options against layer-level ones")
    script.parser.add_argument("--costs-only", action="store_true", help="per-option costs only, no searches")
    script.parser.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side serving")
    args, cfg = script.parse(argv)
    settings = search_settings(cfg)
    every = {**settings.space, "options": [*LAYER_ONLY, *MIXED_OPTIONS], "prune_dominated": False}
    prepared = prepare(dataclasses.replace(settings, space=every))
    bench, space = prepared.bench, prepared.space
    options = list(space.options)
    cost = prepared.cost
    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    kv = {o: cost.kv_layer_bytes[o][0] for o in options}
    measured = {"prefill_ms_per_layer": {o: cost.prefill_s[o] * 1e3 for o in options},
                "step_ms_per_layer": {o: dict(zip(map(str, cost.grid), (v * 1e3 for v in cost.step_s[o])))
                                      for o in options}, "kv_bytes_per_layer": kv, "not_run": prepared.notes}
    results.table(f"Per-layer cost above `none` at the workload (ms; uniform plans taking turns, median of "
                  f"{settings.workload.repeats} rounds): a prompt's prefill, a decode step at each concurrency; "
                  f"cache bytes of one layer per sequence at {settings.workload.context:,} tokens",
                  ["option", "prefill ms", *(f"step ms at {b}" for b in cost.grid), "cache bytes"],
                  [[o, cost.prefill_s[o] * 1e3, *(v * 1e3 for v in cost.step_s[o]), kv[o]] for o in options])
    for note in prepared.notes:
        results.note(f"not run: {note}")
    if args.costs_only:
        results.add_run(measured)
        results.write()
        return

    found = {}
    for label, chosen in (("layer options", LAYER_ONLY), ("with mixed", options)):
        space_settings = {**settings.space, "options": chosen, "prune_dominated": False}
        run_dir = run_search(dataclasses.replace(settings, space=space_settings))
        found[label] = fastest_keeping_floors(run_dir)
        print(f"{label}: {found[label]}")
    n = bench.switcher.num_layers
    plans = {"all-softmax": LayerPlan.uniform("softmax", n)}
    plans.update({label: LayerPlan.from_string(got[0]) for label, got in found.items() if got is not None})
    at_once = {label: cost.concurrency(plan) for label, plan in plans.items()}
    served = serve_in_turns(bench.switcher, plans, settings.workload, at_once, args.rounds)

    def ratio(label, metric):
        return statistics.median(a.metric(metric) / b.metric(metric)
                                 for a, b in zip(served[label], served["all-softmax"]))

    measured.update({"fastest_keeping_floors": found, "concurrency": at_once,
                     "served": {label: [dataclasses.asdict(s) for s in runs] for label, runs in served.items()}})
    results.add_run(measured)
    evidence = {label: (found.get(label) or (None, {}))[1] for label in plans}
    base_kv = cost.kv_bytes(plans["all-softmax"])
    results.table(f"The fastest plan keeping the floors in each search and all-softmax serving the workload in turns "
                  f"({args.rounds} rounds, each at the concurrency its cache allows)",
                  ["search space", "plan", "sequences at once", "throughput vs all-softmax", "TTFT vs all-softmax",
                   "TPOT vs all-softmax", "in the search: throughput measured", "predicted", "KL (pick rung)",
                   "retrieval (pick rung)", "cache vs all-softmax"],
                  [[label, str(plan), at_once[label], ratio(label, "throughput"), ratio(label, "ttft"),
                    ratio(label, "tpot"), evidence[label].get("throughput_measured"),
                    evidence[label].get("throughput_predicted"), evidence[label].get("kl"),
                    evidence[label].get("retrieval_acc"), cost.kv_bytes(plan) / base_kv]
                   for label, plan in plans.items()])
    for label in ("layer options", "with mixed"):
        if found.get(label) is None:
            results.note(f"{label}: no plan but the original keeps the floors")
        else:
            results.headline(f"fastest retrieval-keeping plan ({label}): output tokens/s over all-softmax's",
                             round(ratio(label, "throughput"), 3), "x")
            results.headline(f"fastest retrieval-keeping plan ({label}): cache bytes over all-softmax's",
                             round(cost.kv_bytes(plans[label]) / base_kv, 3), "x")
    results.write()


if __name__ == "__main__":
    run(main)
