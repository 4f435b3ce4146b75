"""Latency cost model against measured end-to-end forward time, and KV bytes against the hybrid cache.

    python benchmarks/bench_cost_model.py [--plans 10] [--workloads 512:0,2048:0,1024:16] [--repeats 3] [overrides...]

For each workload (prefill length : cached decode steps after it, batch 1) the additive cost model is built from the three uniform plans
(as the search does), then random plans it was not built from are timed end to end (median of `repeats`,
measured round-robin so drift hits every plan alike) and compared with the prediction: absolute percentage
error per plan and its median. KV bytes: the model's formula against the bytes the hybrid cache really
holds after a prefill of that length (`HybridCache.kv_bytes()`), which must agree exactly.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from layerboost_core.cache import HybridCache
from layerboost.config import compose
from layerboost.settings import workbench_settings
from layerboost_core.logs import quiet_libraries
from layerboost_core.plan import LayerPlan
from layerboost_core.workbench import open_workbench
from layerboost_surrogates.cost_model import Workload, run_request, kv_bytes_per_sequence, measure_uniform

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


def time_plans(switcher, plans: list[LayerPlan], ids: torch.Tensor, decode: int, repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in plans]
    with torch.inference_mode():
        for round_index in range(repeats + 1):  # round 0 warms up
            for i, plan in enumerate(plans):
                switcher.apply(plan)
                start = time.perf_counter()
                run_request(switcher.model, ids, decode)  # exactly what the cost model times
                if round_index:
                    times[i].append(time.perf_counter() - start)
    switcher.restore()
    return [statistics.median(t) for t in times]


def measured_kv_bytes(model, switcher, plan: LayerPlan, ids: torch.Tensor) -> int:
    switcher.apply(plan)
    cache = HybridCache(model)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    switcher.restore()
    return cache.kv_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=10)
    parser.add_argument("--workloads", default="512:0,2048:0,1024:16", help="prefill:decode,...")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_libraries()
    cfg = compose(args.overrides)
    bench = open_workbench(workbench_settings(cfg), with_bank=False)  # timing and cache sizes do not depend on trained weights
    switcher, model = bench.switcher, bench.model
    plans = random_plans(random.Random(args.seed), switcher.num_layers, args.plans)
    settings = bench.settings.options
    print(f"{model.config.model_type}, {switcher.num_layers} layers, {args.plans} random plans, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    summary = []
    for spec in args.workloads.split(","):
        prefill, decode = (int(x) for x in spec.split(":"))
        workload = Workload(prefill=prefill, decode=decode, batch=1, repeats=args.repeats)
        ids = torch.randint(0, model.config.vocab_size, (1, prefill))
        uniform = measure_uniform(switcher, workload, OPTIONS, ids.device)
        per_layer = {o: (t - uniform["none"]) / switcher.num_layers for o, t in uniform.items()}
        predicted = [uniform["none"] + sum(per_layer[o] for o in p.layers) for p in plans]
        measured = time_plans(switcher, plans, ids, decode, args.repeats)
        errors = [abs(p - m) / m * 100 for p, m in zip(predicted, measured)]
        kv_exact = all(kv_bytes_per_sequence(p, model.config, settings, prefill, model.dtype.itemsize)
                       == measured_kv_bytes(model, switcher, p, ids) for p in plans)
        print(f"\nprefill {prefill}, decode {decode}, batch 1: uniform " + ", ".join(f"{o} {t * 1000:.0f} ms" for o, t in uniform.items()))
        print(f"  {'plan':32s} {'predicted ms':>12s} {'measured ms':>12s} {'APE %':>7s}")
        for plan, p, m, e in zip(plans, predicted, measured, errors):
            print(f"  {str(plan):32s} {p * 1000:12.1f} {m * 1000:12.1f} {e:7.2f}")
        summary.append((spec, statistics.median(errors), max(errors), kv_exact))
    print("\nprefill:decode  median APE %   max APE %   KV bytes exact (after the prefill)")
    for spec, median, worst, exact in summary:
        print(f"{spec:15s} {median:12.2f} {worst:11.2f}   {'yes' if exact else 'NO'}")


if __name__ == "__main__":
    main()
