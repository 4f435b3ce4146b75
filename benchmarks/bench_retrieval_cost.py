"""What the retrieval signal costs the search, and what planting facts does to the KL.

    python benchmarks/bench_retrieval_cost.py [--plans 8] [--rounds 5] [key=value ...]

The search's proxy (the CLI's settings: `data.*`, `proxy.*`, the bank) scores every plan on held-out blocks with
`proxy.facts` facts planted in each (layerboost_core/facts.py): retrieval comes from the same forward as the KL.
Here, on the same held-out blocks:

* cost: one plan's evaluation with the facts (every metric, retrieval included: what the search runs) against
  the evaluation without them (the plain blocks, every token metric: what the search ran before retrieval was in
  every evaluation), the two taking turns (`--rounds` rounds after a warm-up, shared timing helper); the median
  per-round ratio is the figure (target <= 1.2);
* effect on the KL: for all-softmax, all-`linear` and `--plans` random plans, the KL over the planted blocks'
  original-text positions against the KL over the plain blocks, their Spearman rank correlation and relative
  difference (the KL skips the planted and query tokens, but the text after a fact is read with it in context).
"""
from __future__ import annotations

import random
import statistics

import torch
from scipy.stats import spearmanr

from harness import Script, run
from layerboost.settings import workbench_settings
from layerboost_core.metrics import ProxyEvaluator
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import round_ratios, time_rounds
from layerboost_core.workbench import open_workbench


def random_plan(rng: random.Random, n: int) -> LayerPlan:
    """A plan replacing a random share (0-60%) of its layers, `linear` 2:1 over `none`."""
    replaced = rng.uniform(0.0, 0.6)
    return LayerPlan(tuple("softmax" if rng.random() >= replaced else rng.choice(["linear", "linear", "none"])
                           for _ in range(n)))


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="retrieval_cost", title="Retrieval in every evaluation: cost and KL",
                    runs=False)
    script.parser.add_argument("--plans", type=int, default=8, help="random plans for the KL comparison")
    script.parser.add_argument("--rounds", type=int, default=5, help="counted rounds of the timing")
    args, cfg = script.parse(argv)
    settings = workbench_settings(cfg)
    bench = open_workbench(settings, with_bank=True)
    n = bench.switcher.num_layers
    planted = bench.proxy_evaluator()  # the search's own: facts planted, every metric
    plain = ProxyEvaluator(bench.model, bench.splits.heldout, settings.proxy.batch_size, settings.proxy.reference_top_k)
    facts = planted.blocks.num_facts
    scored = int(planted.blocks.scored.sum())

    bench.switcher.apply(LayerPlan.from_string("SL" * (n // 2) + "S" * (n % 2)))
    with torch.inference_mode():
        times = time_rounds({"without_facts": plain.evaluate, "with_retrieval": planted.evaluate},
                            rounds=args.rounds, warmup=1, device=bench.loaded.device, alternate=True)
    ratios = round_ratios(times, "without_facts")["with_retrieval"]
    ratio = statistics.median(ratios)
    print(f"evaluation with retrieval / without: {ratio:.3f} (median of {args.rounds} rounds)")

    rng = random.Random(0)
    plans = [LayerPlan.uniform("softmax", n), LayerPlan.uniform("linear", n),
             *(random_plan(rng, n) for _ in range(args.plans))]
    rows = []
    for plan in plans:
        bench.switcher.apply(plan)
        with_facts = planted.evaluate()
        rows.append({"plan": str(plan), "kl_planted": with_facts["kl"], "kl_plain": plain.evaluate(["kl"])["kl"],
                     "retrieval_acc": with_facts["retrieval_acc"], "retrieval_nll": with_facts["retrieval_nll"]})
        print(f"{plan}: done")
    bench.switcher.restore()
    varied = [r for r in rows if r["kl_plain"] > 0]
    rho = float(spearmanr([r["kl_plain"] for r in varied], [r["kl_planted"] for r in varied])[0])
    relative = [r["kl_planted"] / r["kl_plain"] - 1 for r in varied]

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.add_run({"seconds": times, "round_ratios": ratios, "ratio_median": ratio, "plans": rows,
                     "spearman_kl_planted_vs_plain": rho, "kl_relative_difference": relative,
                     "facts": facts, "scored_positions": scored, "blocks": planted.blocks.num_blocks,
                     "block_tokens": int(planted.blocks.input_ids.shape[1])})
    blocks, length = planted.blocks.num_blocks, int(planted.blocks.input_ids.shape[1])
    results.table(f"One evaluation ({blocks} block(s) of {length:,} tokens, {facts} facts; {args.rounds} rounds, plans "
                  "taking turns)", ["without facts s (median)", "with retrieval s (median)", "ratio (median of rounds)",
                                    "ratio min", "ratio max"],
                  [[statistics.median(times["without_facts"]), statistics.median(times["with_retrieval"]), ratio,
                    min(ratios), max(ratios)]])
    results.table(f"KL on the planted blocks ({scored:,} original-text positions scored) vs the plain blocks",
                  ["plan", "KL plain", "KL planted", "retrieval_acc", "retrieval_nll"],
                  [[r["plan"], r["kl_plain"], r["kl_planted"], r["retrieval_acc"], r["retrieval_nll"]] for r in rows])
    results.headline("evaluation with retrieval over one without (same blocks)", round(ratio, 3), "x")
    results.headline("Spearman of KL on planted vs plain blocks", round(rho, 3))
    results.note(f"relative KL difference planted vs plain over {len(varied)} plans: median "
                 f"{statistics.median(relative):+.1%}, range {min(relative):+.1%} to {max(relative):+.1%}")
    results.write()


if __name__ == "__main__":
    run(main)
