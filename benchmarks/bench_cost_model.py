"""Latency cost model against measured end-to-end forward time, and KV bytes against the hybrid cache.

    python benchmarks/bench_cost_model.py [--plans 10] [--workloads 512:0,2048:0,1024:16] [--repeats 3]
                                          [--seed 0] [--runs 1] [key=value ...]

Model, device, dtype and option settings are the CLI's (`key=value` overrides). For each workload (prefill
length : cached decode steps after it, batch 1) the additive cost model is built from the three uniform plans
(as the search does), then random plans it was not built from are timed end to end (median of `repeats`
rounds, measured round-robin with the shared timing helper so drift hits every plan alike) and compared with
the prediction: absolute percentage error per plan and its median. KV bytes: the model's formula against the
bytes the hybrid cache really holds after a prefill of that length (`HybridCache.kv_bytes()`), which must
agree exactly.
"""
from __future__ import annotations

import random
import statistics

import torch

from harness import Script, open_model, run
from layerboost_core.cache import HybridCache
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import time_plans
from layerboost_surrogates.cost_model import Workload, kv_bytes_per_sequence, measure_uniform, run_request

OPTIONS = ("softmax", "linear", "none")


def random_plans(rng: random.Random, n_layers: int, count: int) -> list[LayerPlan]:
    """Plans with a random mix (each option's share drawn per plan), none of them uniform."""
    plans: list[LayerPlan] = []
    while len(plans) < count:
        weights = [rng.random() for _ in OPTIONS]
        plan = LayerPlan(tuple(rng.choices(OPTIONS, weights)[0] for _ in range(n_layers)))
        if len(set(plan.layers)) > 1 and plan not in plans:
            plans.append(plan)
    return plans


def measured_kv_bytes(model, switcher, plan: LayerPlan, ids: torch.Tensor) -> int:
    switcher.apply(plan)
    cache = HybridCache(model)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    switcher.restore()
    return cache.kv_bytes()


def workloads(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in spec.split(":")) for spec in text.split(",")]


def measure(loaded, switcher, options: dict, plans: list[LayerPlan], specs, repeats: int) -> dict:
    """One run: per workload, the uniform plans' times, every plan's predicted and measured seconds, APE."""
    model = loaded.model
    out = {}
    for prefill, decode in specs:
        workload = Workload(prefill=prefill, decode=decode, batch=1, repeats=repeats)
        ids = torch.randint(0, model.config.vocab_size, (1, prefill), device=loaded.device)
        uniform = measure_uniform(switcher, workload, OPTIONS, loaded.device)
        per_layer = {o: (t - uniform["none"]) / switcher.num_layers for o, t in uniform.items()}
        predicted = [uniform["none"] + sum(per_layer[o] for o in p.layers) for p in plans]
        rounds = time_plans(switcher, {str(p): p for p in plans}, lambda m: run_request(m, ids, decode),
                            rounds=repeats, warmup=1)
        measured = [statistics.median(rounds[str(p)]) for p in plans]
        errors = [abs(p - m) / m * 100 for p, m in zip(predicted, measured)]
        kv_exact = all(kv_bytes_per_sequence(p, model.config, options, prefill, model.dtype.itemsize)
                       == measured_kv_bytes(model, switcher, p, ids) for p in plans)
        out[f"{prefill}:{decode}"] = {
            "uniform_s": uniform, "median_ape_pct": statistics.median(errors), "max_ape_pct": max(errors),
            "kv_bytes_exact": kv_exact, "predicted_s": predicted, "measured_s": measured, "ape_pct": errors,
            "rounds_s": rounds}
    return out


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="cost_model", title="Cost model against measured latency", runs=True)
    script.parser.add_argument("--plans", type=int, default=10, help="random plans timed end to end")
    script.parser.add_argument("--workloads", type=workloads, default=workloads("512:0,2048:0,1024:16"),
                               help="prefill:decode,...")
    script.parser.add_argument("--repeats", type=int, default=3, help="counted rounds per timing")
    script.parser.add_argument("--seed", type=int, default=0, help="seed of the random plans")
    args, cfg = script.parse(argv)
    loaded, switcher, settings = open_model(cfg)  # timing and cache sizes do not depend on trained weights
    plans = random_plans(random.Random(args.seed), switcher.num_layers, args.plans)
    print(f"{loaded.info['name']} ({loaded.info['model_type']}), {switcher.num_layers} layers, {args.plans} random "
          f"plans, {torch.get_num_threads()} threads, median of {args.repeats}, {args.runs} run(s)")
    results = script.results()
    results.describe(loaded.device, loaded.dtype)
    for index in range(args.runs):
        results.add_run({"plans": [str(p) for p in plans],
                         **measure(loaded, switcher, settings.options, plans, args.workloads, args.repeats)})
        print(f"run {index + 1}/{args.runs} done")

    last = results.runs[-1]
    for prefill, decode in args.workloads:
        key = f"{prefill}:{decode}"
        w = last[key]
        results.table(f"prefill {prefill}, decode {decode}, batch 1 (last run): predicted against measured",
                      ["plan", "predicted ms", "measured ms", "APE %"],
                      [[str(p), pr * 1000, me * 1000, e]
                       for p, pr, me, e in zip(plans, w["predicted_s"], w["measured_s"], w["ape_pct"])],
                      note="uniform plans: " + ", ".join(f"{o} {t * 1000:.1f} ms" for o, t in w["uniform_s"].items()))
    rows = [[f"{p}:{d}", results.median(f"{p}:{d} / median_ape_pct"), results.median(f"{p}:{d} / max_ape_pct"),
             "yes" if all(r[f"{p}:{d}"]["kv_bytes_exact"] for r in results.runs) else "NO"]
            for p, d in args.workloads]
    results.table(f"Summary (median over {args.runs} run(s))",
                  ["prefill:decode", "median APE %", "max APE %", "KV bytes exact (after the prefill)"], rows)
    p, d = args.workloads[0]
    results.headline(f"cost model median latency error, {args.plans} random plans, prefill {p} + decode {d}",
                     round(results.median(f"{p}:{d} / median_ape_pct"), 1), "%")
    results.write()


if __name__ == "__main__":
    run(main)
