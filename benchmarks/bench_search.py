"""Search quality at proxy fidelity: hypervolume of the front reached by each search method, equal evaluations.

    python benchmarks/bench_search.py [--budgets 30,60,120] [--max-kl 1.0] [--cache-file F] [key=value ...]

The hypervolume of the front (KL vs predicted latency, one fixed reference point) reached by the paper's
threshold heuristic, random search, NSGA-II, TPE and our default search (TPE multivariate + seeds + surrogate
proposals, as `python search.py` runs it), and the same with the surrogate off, at equal numbers of
evaluations (the default model: SmolLM2). The last row is the front of every plan evaluated by any method (an
empirical ceiling for all of them). Every method runs in this process on one shared evaluation cache (a plan
evaluated by one method is not re-evaluated by another; evaluation is deterministic), so the comparison costs
one evaluation per distinct plan. The settings are the search's (`key=value` overrides as for `search.py`).
Writes the hypervolume table with ratios to the heuristic.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import optuna
from tqdm.auto import tqdm

from harness import Script, ints, run
from layerboost.settings import search_settings
from layerboost_core.metrics import METRICS_VERSION, ProxyEvaluator
from layerboost_core.pareto import hypervolume_2d
from layerboost_core.plan import LayerPlan
from layerboost_core.sensitivity import cached_sensitivity
from layerboost_core.space import SearchSpace
from layerboost_core.workbench import open_workbench
from layerboost_search.driver import SearchRun, enqueue_seeds
from layerboost_search.objectives import SPEEDS, declare_objectives
from layerboost_search.pipeline import make_surrogate_feed
from layerboost_search.seeds import heuristic_sweep, seed_plans
from layerboost_surrogates.serving_cost import serving_cost_model


class CachedEvaluator:
    """A runner (capacity 1) that evaluates in this process and remembers every plan's metrics, optionally
    in a JSON file keyed by what the numbers depend on (bank, held-out data, metrics version), so a rerun
    with other budgets or methods only evaluates plans it has not seen."""

    capacity = 1

    def __init__(self, bench, proxy, cache_file: Path | None = None, key: str = ""):
        self.bench, self.proxy, self.cache, self.queue = bench, proxy, {}, []
        self.cache_file, self.key = cache_file, key
        if cache_file is not None and cache_file.exists():
            stored = json.loads(cache_file.read_text())
            if stored.get("key") == key:
                self.cache = stored["metrics"]
        self.loaded = len(self.cache)

    def metrics(self, plan_text: str) -> dict:
        if plan_text not in self.cache:
            self.bench.switcher.apply(LayerPlan.from_string(plan_text))
            self.cache[plan_text] = self.proxy.evaluate()
        return self.cache[plan_text]

    def save(self) -> None:
        if self.cache_file is not None:
            tmp = self.cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": self.key, "metrics": self.cache}))
            tmp.replace(self.cache_file)

    def submit(self, key, method, plan_text):
        self.queue.append((key, plan_text))

    def next_result(self):
        key, plan_text = self.queue.pop(0)
        return key, {"metrics": self.metrics(plan_text), "seconds": 0.0}

    def close(self):
        pass


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="search", title="Search quality")
    script.parser.add_argument("--budgets", type=ints, default=(30, 60, 120), help="comma-separated, e.g. 30,60,120")
    script.parser.add_argument("--max-kl", type=float, default=1.0,
                               help="KL of the reference point: plans worse than this count for nothing (all-none: ~8)")
    script.parser.add_argument("--cache-file", type=Path, default=None,
                               help="JSON file of evaluated plans' metrics, reused by later runs with the same bank and data")
    args, cfg = script.parse(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = search_settings(cfg)
    bench = open_workbench(settings.workbench, with_bank=True)
    n = bench.switcher.num_layers
    proxy = ProxyEvaluator(bench.model, bench.splits.heldout)
    rows = cached_sensitivity(bench.switcher, proxy, (bench.bank.id, bench.splits.hashes["heldout"]), progress=False)
    space = SearchSpace.from_mapping(settings.space, n)
    cost = serving_cost_model(bench.switcher, bench.info, bench.settings.options, settings.workload,
                              space.options, speed=settings.speed)  # cost.latency: the searched metric's cost
    objectives = declare_objectives(settings.objective, settings.speed)
    speed = SPEEDS[settings.speed]
    runner = CachedEvaluator(bench, proxy, args.cache_file,
                             f"{bench.bank.id}/{bench.splits.hashes['heldout']}/metrics-v{METRICS_VERSION}")
    if runner.loaded:
        print(f"{runner.loaded} plans' metrics reused from {args.cache_file}")
    top = max(args.budgets)

    def points_of(plans):
        return [(cost.latency(p), runner.metrics(str(p))["kl"]) for p in plans]

    # The reference KL bounds the region that matters: with all-none's KL (~8 nats) as the bound, plans a
    # user could never ship would dominate the hypervolume and every method would look alike.
    reference = (cost.latency(LayerPlan.uniform("softmax", n)) * 1.05, args.max_kl)
    print(f"reference point: {speed.label} cost {reference[0]:.4g} (1.05 x all-softmax's), KL {reference[1]:.3f}")

    results: dict[str, dict[int, float]] = {}
    started = time.perf_counter()
    for budget in tqdm(args.budgets, desc="paper heuristic", unit="budget"):
        plans = [p for _, p in heuristic_sweep(rows, n, budget)]
        results.setdefault("paper heuristic", {})[budget] = hypervolume_2d(points_of(plans), reference)
    print(f"heuristic done ({time.perf_counter() - started:.0f} s, {len(runner.cache)} plans evaluated so far)")
    runner.save()

    methods = {
        "random": (optuna.samplers.RandomSampler(seed=0), False),
        "nsga2": (optuna.samplers.NSGAIISampler(population_size=20, seed=0), False),
        "tpe": (optuna.samplers.TPESampler(multivariate=True, seed=0), False),
        "ours, surrogate off": (optuna.samplers.TPESampler(multivariate=True, n_startup_trials=10, seed=0), True),
        "ours (default)": (optuna.samplers.TPESampler(multivariate=True, n_startup_trials=10, seed=0), True),
    }
    surrogate_on = dataclasses.replace(settings, surrogate=dataclasses.replace(settings.surrogate, enabled=True))
    for name, (sampler, seeded) in methods.items():
        study = optuna.create_study(directions=[o.direction for o in objectives], sampler=sampler)
        if seeded:
            enqueue_seeds(study, space, seed_plans(rows, n, space=space, cost=cost))
        feed = (make_surrogate_feed(surrogate_on, space, cost, rows, objectives)
                if name == "ours (default)" else None)
        search = SearchRun(settings.objective, space, objectives, study, cost, runner, feed)
        print(f"{name} ...", flush=True)
        search.run(top, progress=True)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        for budget in args.budgets:
            first = done[:budget]
            results.setdefault(name, {})[budget] = hypervolume_2d([(speed.cost(t.values[1]), t.values[0])
                                                                   for t in first], reference)
        print(f"{name} done ({time.perf_counter() - started:.0f} s, {len(runner.cache)} distinct plans evaluated)")
        runner.save()

    # An empirical ceiling: the front of every plan any method evaluated (plus those reused from the cache
    # file). No search of one budget can do better than this without finding plans nobody has evaluated.
    everything = [(cost.latency(LayerPlan.from_string(text)), m["kl"]) for text, m in runner.cache.items()]
    results[f"every plan evaluated ({len(everything)})"] = {b: hypervolume_2d(everything, reference) for b in args.budgets}
    base = results["paper heuristic"]
    best_plain = {b: max(results[m][b] for m in ("random", "nsga2", "tpe")) for b in args.budgets}
    out = script.results()
    out.describe(bench.loaded.device, bench.loaded.dtype)
    out.add_run({"hypervolume": {name: {str(b): v for b, v in by_budget.items()} for name, by_budget in results.items()},
                 "reference": {"speed_cost": reference[0], "kl": reference[1]},
                 "distinct_plans_evaluated": len(runner.cache), "seconds": time.perf_counter() - started})
    out.table(f"Hypervolume (KL vs predicted {speed.label}) and ratio to the paper heuristic",
              ["method", *(f"{b} evals" for b in args.budgets)],
              [[name, *(f"{by_budget[b]:.4f} ({by_budget[b] / base[b]:.3f}x)" for b in args.budgets)]
               for name, by_budget in results.items()],
              note=f"reference point: {speed.label} cost {reference[0]:.4g} (1.05 x all-softmax's), KL {reference[1]:.3f}")
    out.table("Ratio to the best of random / NSGA-II / TPE", ["method", *(f"{b} evals" for b in args.budgets)],
              [[name, *(results[name][b] / best_plain[b] for b in args.budgets)]
               for name in ("ours, surrogate off", "ours (default)")])
    top_budget = max(args.budgets)
    out.headline(f"search hypervolume over the paper heuristic's, {top_budget} evaluations",
                 round(results["ours (default)"][top_budget] / base[top_budget], 3), "x")
    out.write()


if __name__ == "__main__":
    run(main)
