"""Proxy metrics and offline lm-eval tasks (the default model: SmolLM2).

    python benchmarks/bench_proxy.py [--plans 20] [--repeats 3] [--overhead-only] [key=value ...]
                                     e.g. eval.n_examples=24

Proxy evaluation overhead: time to evaluate one plan over the time of a bare forward over the same held-out
tokens (the two take turns through the shared timing helper, one warm-up round, `--repeats` rounds; medians and
the per-round ratio). Then the offline tasks' accuracy (`eval.tasks`, `eval.n_examples`, ...) for all-softmax,
all-linear, all-none and, over `--plans` random plans, the Spearman rank correlation between proxy KL and each
task's accuracy. With `--overhead-only` the results file is `proxy_overhead`, else `proxy`.
"""
from __future__ import annotations

import random
import statistics
import time

import torch
from scipy.stats import spearmanr

from harness import Script, run
from layerboost.settings import eval_settings, search_settings, workbench_settings
from layerboost_core import lm_eval_tasks
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import round_ratios, time_rounds
from layerboost_core.workbench import open_workbench


def random_plan(rng: random.Random, n: int) -> LayerPlan:
    """A plan whose share of replaced layers is itself random (0-70%; replaced layers are linear 2:1 over
    none): uniform choices per layer would make a third of the layers `none` in every plan, put every plan
    near chance on the tasks and leave nothing to rank."""
    replaced = rng.uniform(0.0, 0.7)
    return LayerPlan(tuple("softmax" if rng.random() >= replaced else rng.choice(["linear", "linear", "none"])
                           for _ in range(n)))


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="proxy", title="Proxy metrics and offline tasks")
    script.parser.add_argument("--plans", type=int, default=20, help="random plans for the correlations")
    script.parser.add_argument("--repeats", type=int, default=3, help="counted rounds of the overhead timing")
    script.parser.add_argument("--overhead-only", action="store_true", help="stop after the overhead measurement")
    args, cfg = script.parse(argv)
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    n, heldout = bench.switcher.num_layers, bench.splits.heldout
    proxy = ProxyEvaluator(bench.model, heldout)

    def bare():
        for i in range(0, heldout.shape[0], proxy.batch_size):
            bench.model(input_ids=heldout[i:i + proxy.batch_size, :-1], use_cache=False)

    bench.switcher.apply(LayerPlan.from_string("SL" * (n // 2) + "S" * (n % 2)))
    with torch.inference_mode():
        times = time_rounds({"bare": bare, "evaluate": proxy.evaluate}, rounds=args.repeats, warmup=1,
                            device=bench.loaded.device)
    b, e = statistics.median(times["bare"]), statistics.median(times["evaluate"])
    overhead = {"bare_s": b, "evaluate_s": e, "ratio_of_medians": e / b,
                "median_round_ratio": statistics.median(round_ratios(times, "bare")["evaluate"]), "rounds_s": times}
    print(f"proxy overhead: evaluate {e:.3f} s / bare forward {b:.3f} s = {e / b:.3f}")
    results = script.results("proxy_overhead" if args.overhead_only else None,
                             "Proxy evaluation overhead" if args.overhead_only else None)
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.table(f"Proxy evaluation overhead ({heldout.shape[0]} x {heldout.shape[1] - 1} tokens, median of "
                  f"{args.repeats} rounds)", ["evaluate s", "bare forward s", "ratio", "median per-round ratio"],
                  [[e, b, e / b, overhead["median_round_ratio"]]])
    results.headline("proxy evaluation over a bare forward", round(e / b, 3), "x")
    if args.overhead_only:
        results.add_run({"overhead": overhead})
        results.write()
        return

    settings = eval_settings(cfg)
    tasks = list(settings.tasks)
    task_dir = lm_eval_tasks.write_offline_tasks(
        None, bench.splits.documents["heldout"], bench.loaded.tokenizer,
        settings.task_settings(search_settings(cfg).workload.prefill))

    def score(plan: LayerPlan) -> tuple[float, dict]:
        bench.switcher.apply(plan)
        kl = proxy.evaluate(["kl"])["kl"]
        return kl, lm_eval_tasks.evaluate_tasks(bench.model, bench.loaded.tokenizer, tasks, task_dir,
                                                batch_size=settings.batch_size, limit=settings.limit)

    uniform = {}
    for option in ("softmax", "linear", "none"):
        started = time.perf_counter()
        kl, scores = score(LayerPlan.uniform(option, n))
        uniform[f"all-{option}"] = {"kl": kl, **scores, "seconds": time.perf_counter() - started}
        print(f"all-{option} done")

    rng = random.Random(0)
    sampled = []
    started = time.perf_counter()
    for _ in range(args.plans):
        plan = random_plan(rng, n)
        kl, scores = score(plan)
        sampled.append({"plan": str(plan), "kl": kl, **scores})
    random_seconds = time.perf_counter() - started
    bench.switcher.restore()
    correlation = {}
    for t in tasks:
        rho, p = spearmanr([s["kl"] for s in sampled], [s[t] for s in sampled])
        correlation[t] = {"spearman": float(rho), "p": float(p)}
    results.add_run({"overhead": overhead, "uniform": uniform, "spearman_kl_vs_accuracy": correlation,
                     "random_plans_seconds": random_seconds, "random_plans": sampled})
    results.table(f"Offline tasks ({settings.n_examples} examples each; passkey context "
                  f"{settings.task_settings(search_settings(cfg).workload.prefill)['passkey_context']} "
                  "tokens)", ["plan", "KL", *tasks, "seconds"],
                  [[label, u["kl"], *(u[t] for t in tasks), round(u["seconds"])] for label, u in uniform.items()])
    results.table(f"Over {args.plans} random plans ({random_seconds:.0f} s; KL "
                  f"{min(s['kl'] for s in sampled):.3f}..{max(s['kl'] for s in sampled):.3f})",
                  ["task", "Spearman(proxy KL, accuracy)", "p", "accuracy range"],
                  [[t, correlation[t]["spearman"], correlation[t]["p"],
                    f"{min(s[t] for s in sampled):.3f}..{max(s[t] for s in sampled):.3f}"] for t in tasks])
    for t in tasks:
        results.headline(f"Spearman(proxy KL, {t} accuracy) over {args.plans} random plans",
                         round(correlation[t]["spearman"], 3))
    results.write()


if __name__ == "__main__":
    run(main)
