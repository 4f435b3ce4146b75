"""Plans serving a workload against all-softmax: whole requests measured, the search's steady-state measurement,
and the serving cost model's prediction, side by side.

    python benchmarks/bench_serving.py [--plans NAME=PLAN,...] [--best FILE,...] [--random N] [--runs 2]
                                       [--rounds 3] [--whole-rounds 2] [--no-whole] [--no-predict] [--prefills 3]
                                       [key=value ...]

Plans: `--plans` (compact strings), `--best` (best files of a search: their plan and option settings; the workload
is the config's, e.g. `workload=long-document` to serve a pick where it was not searched), `--random N` (N plans,
each layer an option of the space drawn uniformly, seeded). Every run, for every plan and all-softmax, each at the
concurrency its cache allows under the workload's memory budget, plans taking turns:

* whole requests (unless `--no-whole`): `concurrency` prompts prefilled one at a time, then every one of the
  `decode` steps of the batch (layerboost_core.serving.serve_requests): output tokens/s = tokens / total seconds;
  `--whole-rounds` rounds, plans taking turns (in reverse order every other round), each plan's ratio to
  all-softmax taken within a round and the median over rounds kept (a machine drifting over minutes moves both
  sides of a ratio alike);
* steady state (`--rounds` rounds): what the search confirms its picks with (serve_in_turns): one prefill (TTFT),
  a few decode steps at the mean context (TPOT), throughput from them;
* predicted: the serving cost model (layerboost_surrogates.serving_cost), measured once per device and cached.

Ratios to all-softmax in the same run; the tables show the median over runs with the range. With `--random`, the
headlines are the cost model's errors against whole requests: of its absolute values, and of the ratios to
all-softmax the search judges plans by (the issue's check: within 10%).
"""
from __future__ import annotations

import random
import statistics

from harness import Script, named_plans, run, with_best_settings


def plans_to_serve(args, n_layers: int, options) -> dict:
    """{name: plan string} from --plans, --best (harness.named_plans) and --random (all-softmax added by the
    caller)."""
    plans = named_plans(args.plans, args.best, n_layers)
    rng = random.Random(args.seed)
    codes = {"softmax": "S", "linear": "L", "none": "N", "mixed1": "1", "mixed2": "2"}
    for k in range(args.random):
        plans[f"random-{k}"] = "".join(codes[rng.choice(options)] for _ in range(n_layers))
    return plans


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="serving", title="Plans serving a workload against all-softmax", runs=True)
    script.parser.add_argument("--plans", default="", help="comma-separated NAME=PLAN (compact strings)")
    script.parser.add_argument("--best", default="", help="comma-separated best files (plan JSON)")
    script.parser.add_argument("--random", type=int, default=0, help="random plans to add")
    script.parser.add_argument("--seed", type=int, default=0, help="seed of the random plans")
    script.parser.add_argument("--rounds", type=int, default=3, help="steady-state rounds per run")
    script.parser.add_argument("--whole-rounds", type=int, default=2,
                               help="rounds of whole requests per run, plans taking turns")
    script.parser.add_argument("--no-whole", action="store_true", help="skip whole requests (steady state only)")
    script.parser.add_argument("--no-predict", action="store_true",
                               help="skip the cost model (its pieces take minutes at long prompts on a CPU)")
    script.parser.add_argument("--prefills", type=int, default=3, help="prefills per TTFT measurement (the fastest)")
    args, cfg = script.parse(argv)

    from layerboost.settings import search_settings
    from layerboost_core.plan import LayerPlan
    from layerboost_core.serving import serve_in_turns, serve_requests
    from layerboost_core.timing import round_ratios
    from layerboost_core.workbench import attach_head_choices, open_workbench
    from layerboost_surrogates.cost_model import sequences_at_once
    from layerboost_surrogates.serving_cost import serving_cost_model

    settings = search_settings(cfg)
    # the kept heads (and linear settings) the picks were made with
    bench = open_workbench(with_best_settings(settings.workbench, args.best))
    n = bench.switcher.num_layers
    options = [o for o in settings.space["options"]]
    plans = {"all-softmax": "S" * n, **plans_to_serve(args, n, options)}
    used = {o for text in plans.values() for o in LayerPlan.from_string(text).layers}
    attach_head_choices(bench, used)
    workload = settings.workload
    layer_plans = {name: LayerPlan.from_string(text) for name, text in plans.items()}
    cost = None if args.no_predict else serving_cost_model(bench.switcher, bench.info, bench.settings.options,
                                                           workload, sorted(used | {"softmax", "none"}),
                                                           speed="throughput")
    concurrency = sequences_at_once(bench.switcher.model, bench.switcher.settings, workload, layer_plans)
    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    print(f"{bench.info['name']} ({bench.loaded.dtype}), workload {workload}; concurrency {concurrency}")
    reference = cost.predict(layer_plans["all-softmax"]) if cost else None
    for index in range(args.runs):
        steady = serve_in_turns(bench.switcher, layer_plans, workload, concurrency, args.rounds, seed=index,
                                prefills=args.prefills)
        whole = {}  # plan -> one serve_requests result per round
        if not args.no_whole and workload.decode:
            for turn in range(args.whole_rounds):
                order = list(layer_plans) if turn % 2 == 0 else list(reversed(layer_plans))
                for name in order:
                    bench.switcher.apply(layer_plans[name])
                    whole.setdefault(name, []).append(serve_requests(bench.model, workload, concurrency[name],
                                                                     seed=index))
            bench.switcher.restore()
        per_plan = {}
        for name, plan in layer_plans.items():
            predicted = cost.predict(plan) if cost else None
            row = {"plan": plans[name], "concurrency": concurrency[name],
                   "kv_share": kv_of(bench, workload, plan) / kv_of(bench, workload, layer_plans["all-softmax"])}
            for metric in ("throughput", "ttft", "tpot"):
                mine = [s.metric(metric) for s in steady[name]]
                theirs = [s.metric(metric) for s in steady["all-softmax"]]
                ratios = round_ratios({"a": mine, "b": theirs}, "b")["a"] if workload.decode or metric == "ttft" else []
                row[f"{metric}_steady"] = statistics.median(ratios) if ratios else None
                row[f"{metric}_predicted"] = (predicted.metric(metric) / reference.metric(metric)
                                              if predicted and reference.metric(metric) else None)
                row[f"{metric}_value_steady"] = statistics.median(mine) if mine[0] is not None else None
                row[f"{metric}_value_predicted"] = predicted.metric(metric) if predicted else None
            if whole:
                for metric, key in (("throughput", "throughput"), ("ttft", "ttft_s"), ("tpot", "tpot_s")):
                    row[f"{metric}_whole"] = statistics.median(
                        mine[key] / theirs[key] for mine, theirs in zip(whole[name], whole["all-softmax"]))
                row["throughput_value_whole"] = statistics.median(w["throughput"] for w in whole[name])
                row["ttft_value_whole"] = statistics.median(w["ttft_s"] for w in whole[name])
            per_plan[name] = row
            print(f"run {index + 1} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                                          if isinstance(v, float)))
        results.add_run({"plans": per_plan})
    rows = []
    errors = {"throughput": [], "ttft": []}
    # What the search judges plans by: the predicted ratio to all-softmax against the measured one (a machine
    # running slower or faster than when the cost model was measured moves both plans alike).
    ratio_errors = {"throughput": [], "ttft": []}
    for name in plans:
        values = [r["plans"][name] for r in results.runs]

        def cell(key):
            got = [v[key] for v in values if v.get(key) is not None]
            if not got:
                return ""
            return f"{statistics.median(got):.3f} [{min(got):.3f}, {max(got):.3f}]"

        rows.append([name, plans[name], values[0]["concurrency"], round(values[0]["kv_share"], 3),
                     cell("throughput_whole"), cell("throughput_steady"), cell("throughput_predicted"),
                     cell("ttft_whole"), cell("ttft_steady"), cell("ttft_predicted"), cell("tpot_steady"),
                     cell("tpot_predicted")])
        for metric in errors:  # the cost model's absolute value against the measured one, every run
            for v in values:
                measured = v.get(f"{metric}_value_whole") or v.get(f"{metric}_value_steady")
                if measured and v.get(f"{metric}_value_predicted") is not None:
                    errors[metric].append(abs(v[f"{metric}_value_predicted"] / measured - 1))
                measured_ratio = v.get(f"{metric}_whole") or v.get(f"{metric}_steady")
                if name != "all-softmax" and measured_ratio and v.get(f"{metric}_predicted") is not None:
                    ratio_errors[metric].append(abs(v[f"{metric}_predicted"] / measured_ratio - 1))
    results.table(f"Serving at {workload_text(workload)}, {args.runs} run(s): ratio to all-softmax, median over "
                  "runs [range]; whole requests, steady state (what the search confirms with), predicted",
                  ["plan", "layers", "sequences at once", "cache per sequence", "throughput whole", "throughput steady",
                   "throughput predicted", "TTFT whole", "TTFT steady", "TTFT predicted", "TPOT steady",
                   "TPOT predicted"], rows)
    checks = (("error", "{} error", errors, len(plans)),
              ("ratio error", "error of the {} ratio to all-softmax", ratio_errors, len(plans) - 1))
    for kind, what, found, count in checks:
        for metric, values in found.items():
            if values:
                results.summarize(f"cost model {metric} {kind}", values)
                results.headline(f"serving cost model: worst {what.format(metric)} against measured serving, "
                                 f"{count} plans x {args.runs} runs at {workload_text(workload)}",
                                 round(100 * max(values), 1), "%")
    for name in plans:
        if name != "all-softmax" and not name.startswith("random-"):
            got = [r["plans"][name].get("throughput_whole") or r["plans"][name]["throughput_steady"]
                   for r in results.runs]
            if all(g is not None for g in got):
                results.headline(f"{name}: output tokens/s over all-softmax's at {workload_text(workload)} "
                                 f"(slowest run)", round(min(got), 3), "x")
    results.write()


def kv_of(bench, workload, plan) -> int:
    """Cache bytes of one sequence at the workload's context (exact)."""
    from layerboost_surrogates.cost_model import kv_bytes_per_sequence

    model = bench.switcher.model
    return kv_bytes_per_sequence(plan, model.config, bench.switcher.settings, workload.context, model.dtype.itemsize)


def workload_text(workload) -> str:
    memory = f", {workload.memory_gib:g} GiB" if workload.memory_gib is not None else ""
    return f"{workload.prefill}+{workload.decode} tokens x {workload.batch}{memory}"


if __name__ == "__main__":
    run(main)
