"""Proxy metrics and offline lm-eval tasks on SmolLM2.

    python benchmarks/bench_proxy.py [--plans 20] [--repeats 3] [--overhead-only] [overrides...]

Prints: proxy evaluation overhead (time to evaluate one plan / a bare forward over the same held-out
tokens, medians, measured alternately); the offline tasks' accuracy for all-softmax, all-linear, all-none;
and, over random plans, the Spearman rank correlation between proxy KL and each task's accuracy.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from scipy.stats import spearmanr

from layerboost_core import lm_eval_tasks
from layerboost.config import compose
from layerboost.settings import workbench_settings
from layerboost_core.logs import quiet_libraries
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.plan import LayerPlan
from layerboost_core.workbench import open_workbench


def random_plan(rng: random.Random, n: int) -> LayerPlan:
    """A plan whose share of replaced layers is itself random (0-70%; replaced layers are linear 2:1 over
    none): uniform choices per layer would make a third of the layers `none` in every plan, put every plan
    near chance on the tasks and leave nothing to rank."""
    replaced = rng.uniform(0.0, 0.7)
    return LayerPlan(tuple("softmax" if rng.random() >= replaced else rng.choice(["linear", "linear", "none"])
                           for _ in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overhead-only", action="store_true", help="stop after the overhead measurement")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    quiet_libraries()
    cfg = compose(args.overrides)
    bench = open_workbench(workbench_settings(cfg), with_bank=True)
    n, heldout = bench.switcher.num_layers, bench.splits.heldout
    proxy = ProxyEvaluator(bench.model, heldout)

    bare, evaluated = [], []
    bench.switcher.apply(LayerPlan.from_string("SL" * (n // 2) + "S" * (n % 2)))
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            for i in range(0, heldout.shape[0], proxy.batch_size):
                bench.model(input_ids=heldout[i:i + proxy.batch_size, :-1], use_cache=False)
            bare.append(time.perf_counter() - start)
            start = time.perf_counter()
            proxy.evaluate()
            evaluated.append(time.perf_counter() - start)
    b, e = statistics.median(bare[1:]), statistics.median(evaluated[1:])
    print(f"proxy overhead: evaluate {e:.3f} s / bare forward {b:.3f} s = {e / b:.3f} "
          f"({heldout.shape[0]} x {heldout.shape[1] - 1} tokens, median of {args.repeats})")
    if args.overhead_only:
        return

    e_cfg = cfg.eval
    tasks = list(e_cfg.tasks)
    task_dir = lm_eval_tasks.write_offline_tasks(
        None, bench.splits.documents["heldout"], bench.loaded.tokenizer,
        {"n_examples": int(e_cfg.n_examples), "passkey_context": int(e_cfg.passkey_context), "seed": int(cfg.seed)})

    def score(plan: LayerPlan) -> tuple[float, dict]:
        bench.switcher.apply(plan)
        kl = proxy.evaluate(["kl"])["kl"]
        return kl, lm_eval_tasks.evaluate_tasks(bench.model, bench.loaded.tokenizer, tasks, task_dir,
                                                batch_size=int(e_cfg.batch_size), limit=e_cfg.limit)

    print(f"\ntasks {tasks} ({int(e_cfg.n_examples)} examples each; passkey context {int(e_cfg.passkey_context)} tokens)")
    for option in ("softmax", "linear", "none"):
        started = time.perf_counter()
        kl, scores = score(LayerPlan.uniform(option, n))
        print(f"  all-{option:8s} KL {kl:7.4f}  " + "  ".join(f"{t} {v:.3f}" for t, v in scores.items())
              + f"   ({time.perf_counter() - started:.0f} s)")

    rng = random.Random(0)
    kls, accuracies = [], {t: [] for t in tasks}
    started = time.perf_counter()
    for _ in range(args.plans):
        plan = random_plan(rng, n)
        kl, scores = score(plan)
        kls.append(kl)
        for t in tasks:
            accuracies[t].append(scores[t])
    print(f"\n{args.plans} random plans ({time.perf_counter() - started:.0f} s): KL range {min(kls):.3f}..{max(kls):.3f}")
    for t in tasks:
        rho, p = spearmanr(kls, accuracies[t])
        print(f"  Spearman(proxy KL, {t} accuracy) = {rho:+.3f} (p={p:.3g}); accuracy range "
              f"{min(accuracies[t]):.3f}..{max(accuracies[t]):.3f}")
    bench.switcher.restore()


if __name__ == "__main__":
    main()
