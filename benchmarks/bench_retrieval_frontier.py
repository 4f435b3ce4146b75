"""Retrieval against serving speed at the confirmation rung: does any plan that serves >= 2x keep the retrieval floor?

    python benchmarks/bench_retrieval_frontier.py [--plans NAME=PLAN,...] [--best FILE,...] [--ladder] [--blocks N]
                                                  [--rounds 3] [--runs 2] [key=value ...]
                                                  e.g. workload=long-document --blocks 4

The search offers the fastest plan that keeps >= objective.retrieval_floor (90%) of the original's retrieval at the
confirmation rung (`fidelity.pick_rung`): facts planted at depth in prompts of the workload's length, answered by
generating through the hybrid cache. This script puts that rung next to speed for the plans given (typically a
search's front, or the plans of `--best` files; all-softmax is always added; `--ladder` adds hand plans from
all-softmax to all-linear: softmax kept at the layers whose single swap loses the floor at the proxy and `mixed1`
elsewhere, all-`mixed1`, `mixed1` and `linear` alternating, all-`linear`): per plan, the facts found of the rung's facts (with the
original's on the same facts and a 90% Clopper-Pearson interval; kept as a best file keeps it:
picks.keeps_retrieval), KL and top-1 agreement on the rung's blocks, the
cache per sequence, the sequences a memory budget lets it serve, and the serving cost model's predicted throughput
and TTFT; with `--rounds` > 0 also the measured ones (plans taking turns, each at its concurrency; `--runs` runs,
median over every round with the range). Retrieval and KL do not depend on timing (greedy generation): they are
measured once. `--blocks` sets the rung's block count (8 facts each at 512 tokens), e.g. 4 blocks = 32 facts at the
long-document workload's 7,680 tokens, where 16 blocks take too long on a CPU.

The bank (linear layers' learned parts) is the cached one of these settings, trained when absent (minutes).
"""
from __future__ import annotations

import dataclasses
import statistics

from harness import Script, named_plans, run, with_best_settings


def ladder_plans(prepared) -> dict[str, str]:
    """Hand plans from the most cache to the least: softmax at the layers whose single swap loses the retrieval
    floor at the proxy (the search's sensitivity table, cached) and `mixed1` elsewhere, all-`mixed1`, `mixed1`
    and `linear` alternating, all-`linear`."""
    from layerboost_core.sensitivity import cached_sensitivity
    from layerboost_core.workbench import attach_bank
    from layerboost_search.pipeline import sensitivity_options
    from layerboost_search.seeds import retrieval_critical

    bench, settings = prepared.bench, prepared.settings
    n = bench.switcher.num_layers
    attach_bank(bench)
    proxy = bench.proxy_evaluator()
    rows = cached_sensitivity(bench.switcher, proxy, bench.scoring_key(), progress=settings.workbench.progress,
                              options=sensitivity_options(prepared.space))
    floor = settings.objective.retrieval_floor * proxy.original["retrieval_acc"]
    critical = {layer for layer, _ in retrieval_critical(rows, floor, proxy.blocks.num_facts)}
    return {"softmax where a swap loses retrieval, mixed1 elsewhere": "".join("S" if i in critical else "1"
                                                                              for i in range(n)),
            "all-mixed1": "1" * n, "mixed1, linear alternating": ("1L" * n)[:n], "all-linear": "L" * n}


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="retrieval_frontier",
                    title="Retrieval at the confirmation rung against serving speed", runs=True)
    script.parser.add_argument("--plans", default="", help="comma-separated NAME=PLAN (compact strings)")
    script.parser.add_argument("--best", default="", help="comma-separated best files (plan JSON)")
    script.parser.add_argument("--ladder", action="store_true", help="add the hand plans from all-softmax to all-linear")
    script.parser.add_argument("--blocks", type=int, default=None, help="blocks of the confirmation rung (its own when unset)")
    script.parser.add_argument("--rounds", type=int, default=3, help="serving rounds per run (0: predicted only)")
    args, cfg = script.parse(argv)
    if not (args.plans or args.best or args.ladder):
        from layerboost_core.errors import UserError

        raise UserError("--plans, --best, --ladder: none given; allowed: at least one plan to compare with all-softmax")
    from layerboost.settings import search_settings
    from layerboost_core.plan import LayerPlan
    from layerboost_core.serving import serve_in_turns
    from layerboost_core.timing import round_ratios
    from layerboost_search.picks import Interval, keeps_retrieval, retrieval_floor
    from layerboost_search.pipeline import prepare
    from layerboost_search.worker import PlanEvaluator

    settings = search_settings(cfg)
    rung_name = settings.fidelity.pick_rung
    if args.blocks is not None:
        rungs = tuple(dataclasses.replace(r, blocks=args.blocks) if r.name == rung_name else r
                      for r in settings.fidelity.rungs)
        settings = dataclasses.replace(settings, fidelity=dataclasses.replace(settings.fidelity, rungs=rungs))
    # the kept heads the picks were made with, not ones derived again (at another workload, say)
    settings = dataclasses.replace(settings, workbench=with_best_settings(settings.workbench, args.best))
    prepared = prepare(settings)  # the mixed options' kept heads and the serving cost model (cached per device)
    bench, cost, workload = prepared.bench, prepared.cost, prepared.settings.workload
    n = bench.switcher.num_layers
    plans = {"all-softmax": "S" * n, **(ladder_plans(prepared) if args.ladder else {}),
             **named_plans(args.plans, args.best, n)}
    layer_plans = {name: LayerPlan.from_string(text) for name, text in plans.items()}
    evaluator = PlanEvaluator(prepared.settings.evaluator(with_bank=True))
    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)

    confirmed = {}
    for name, text in plans.items():
        got = evaluator.evaluate_at(f"{rung_name}|{text}")
        if "error" in got:
            raise RuntimeError(f"{name}: {got['error']}")
        found = got["per_fact"]["retrieval_acc"]
        original = got["original"]["retrieval_acc"]
        confirmed[name] = {"facts": len(found), "found": int(sum(found)), "original_found": int(sum(original)),
                           "kl": got["metrics"]["kl"], "top1_agreement": got["metrics"]["top1_agreement"],
                           "seconds": got["seconds"]}
        print(f"{name} {text}: {confirmed[name]}", flush=True)

    concurrency = {name: cost.concurrency(plan) for name, plan in layer_plans.items()}
    reference = cost.predict(layer_plans["all-softmax"])
    predicted = {name: {m: cost.predict(plan).metric(m) / reference.metric(m) for m in ("throughput", "ttft")}
                 for name, plan in layer_plans.items()}
    kv = {name: cost.kv_bytes(plan) / cost.kv_bytes(layer_plans["all-softmax"]) for name, plan in layer_plans.items()}
    served = {name: {"throughput": [], "ttft": []} for name in plans}
    for index in range(args.runs if args.rounds > 0 else 0):
        rounds = serve_in_turns(bench.switcher, layer_plans, workload, concurrency, args.rounds, seed=index)
        for metric in ("throughput", "ttft"):
            values = {name: [s.metric(metric) for s in got] for name, got in rounds.items()}
            for name, ratios in round_ratios(values, "all-softmax").items():
                served[name][metric] += ratios
    results.add_run({"confirmed": confirmed, "predicted": predicted, "measured": served, "concurrency": concurrency,
                     "kv_share": kv, "plans": plans, "rung": rung_name})

    floor_share = settings.objective.retrieval_floor
    base = confirmed["all-softmax"]
    rows, keepers = [], []
    for name in sorted(plans, key=lambda k: -predicted[k]["throughput"]):
        c = confirmed[name]
        found, original = Interval.of_facts(c["found"], c["facts"]), Interval.of_facts(c["original_found"], c["facts"])
        # judged as picks judge a best file; no floor where the original itself cannot retrieve
        has_floor = retrieval_floor(settings.objective, {"retrieval_acc": original.value})[0] is not None
        keeps = has_floor and keeps_retrieval(found, original, floor_share)
        measured = served[name]["throughput"]
        if keeps and name != "all-softmax":
            keepers.append((statistics.median(measured) if measured else predicted[name]["throughput"], name))

        def spread(values):
            return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else ""

        rows.append([name, plans[name], round(kv[name], 3), concurrency[name], round(predicted[name]["throughput"], 3),
                     spread(measured), round(predicted[name]["ttft"], 3), spread(served[name]["ttft"]),
                     f"{c['found']}/{c['facts']} [{found.lo:.2f}, {found.hi:.2f}] (original {c['original_found']})",
                     ("yes" if keeps else "no") if has_floor else "no floor", round(c["kl"], 4), round(c["top1_agreement"], 3)])
    facts = base["facts"]
    results.table(f"Plans at the `{rung_name}` rung ({facts} facts in prompts of {workload.prefill:,} tokens, answered "
                  f"by generation) and serving {workload.prefill:,}+{workload.decode:,} tokens under the workload's "
                  f"memory budget, fastest predicted first; throughput and TTFT are ratios to all-softmax, measured: "
                  f"median [range] of {args.runs} x {args.rounds} rounds",
                  ["plan", "layers", "cache per sequence", "sequences at once", "throughput predicted",
                   "throughput measured", "TTFT predicted", "TTFT measured", "facts found [90%]",
                   f"keeps the floor ({floor_share:.0%} of the original's at the low end, or as many facts)", "KL",
                   "top-1 agreement"], rows)
    if keepers:
        speed, name = max(keepers)
        results.headline(f"fastest plan keeping {floor_share:.0%} of the original's retrieval ({facts} facts at "
                         f"{workload.prefill:,} tokens): output tokens/s over all-softmax's, "
                         f"{'measured' if args.rounds > 0 else 'predicted (not served: --rounds 0)'} ({name})",
                         round(speed, 3), "x")
    else:
        results.note(f"no plan given keeps {floor_share:.0%} of the original's retrieval at the `{rung_name}` rung")
    results.write()


if __name__ == "__main__":
    run(main)
