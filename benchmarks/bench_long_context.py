"""Quality at the workload's context: top-k KL against exact KL, and the metric passes' overhead.

    python benchmarks/bench_long_context.py [--top-k 128,512,1024,2048] [--plans SSS... LLL...]
                                            [key=value ...]     e.g. workload.prefill=4096 data.blocks.heldout=2

The same settings as the CLI: held-out blocks of the workload's context (`data.heldout_seq_len`, null: the
workload's prefill), `data.blocks.heldout` of them, drawn from every source of the whole held-out split
(`data.mix_sources`); the bank is the search's (`layerboost transfer`), loaded (or trained) only when a plan has
a `linear` layer. Per plan: exact KL, each top-k KL and its error (top-k is a lower bound), and the time of the
forwards against that of the metric passes (the blocks are plain text: what the planted facts cost is
bench_retrieval_cost.py's). The original model's logits are computed once and every reference is built from
them, so each plan costs one forward per block. Default plans: all-linear, plus two mixed SmolLM2 plans when
the model has their 30 layers.
"""
from __future__ import annotations

import time

import torch

from harness import Script, ints, run
from layerboost.settings import workbench_settings
from layerboost_core.metrics import DEFAULT_TOP_K, reference_of, token_stats
from layerboost_core.plan import LayerPlan
from layerboost_core.workbench import attach_bank, open_workbench

MIXED = ("LLSSSSSLSSSLLLSSLSSLSSLSLLLLLL", "SSSSSNNNNSSSSSSSSNSSSSSSSNNSSN")  # SmolLM2's 30 layers


def block_logits(model, blocks: torch.Tensor):
    """Per block, (targets (1, S-1), logits (1, S-1, V), forward seconds)."""
    for i in range(blocks.shape[0]):
        ids = blocks[i:i + 1]
        started = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        yield ids[:, 1:], logits, time.perf_counter() - started


def kl_by_reference(model, blocks, references, top_ks) -> tuple[dict, float, dict]:
    """Mean KL per reference (None = exact), forward seconds, metric-pass seconds per reference."""
    sums = {k: 0.0 for k in top_ks}
    passes = {k: 0.0 for k in top_ks}
    forward, count = 0.0, 0
    for per_block, (targets, logits, seconds) in zip(references, block_logits(model, blocks)):
        forward += seconds
        count += targets.numel()
        for k in top_ks:
            started = time.perf_counter()
            with torch.inference_mode():
                sums[k] += token_stats(logits, targets, per_block[k]).kl.sum().item()
            passes[k] += time.perf_counter() - started
    return {k: s / count for k, s in sums.items()}, forward, passes


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="long_context", title="Proxy at the workload context")
    script.parser.add_argument("--top-k", type=ints, default=(128, 512, 1024, 2048), help="comma-separated")
    script.parser.add_argument("--plans", nargs="+", default=None,
                               help="compact plans (default: all-linear, and two mixed plans on a 30-layer model)")
    args, cfg = script.parse(argv)
    bench = open_workbench(workbench_settings(cfg))
    model, switcher, splits = bench.model, bench.switcher, bench.splits
    n = switcher.num_layers
    plans = args.plans or ["L" * n, *(m for m in MIXED if len(m) == n)]
    bank = "none (no linear layer in the plans)"
    if any("L" in text for text in plans):  # training the bank takes minutes: only when a plan uses it
        bank = attach_bank(bench).bank.id
    context = int(splits.heldout.shape[1])
    top_ks = [None, *args.top_k]
    print(f"bank {bank}; held-out {tuple(splits.heldout.shape)} (hash {splits.hashes['heldout']}); "
          f"default top-k {DEFAULT_TOP_K}")

    switcher.restore()
    references, build = [], {k: 0.0 for k in top_ks}
    for targets, logits, _ in block_logits(model, splits.heldout):
        per_block = {}
        for k in top_ks:
            started = time.perf_counter()
            per_block[k] = reference_of(logits, targets, k)
            build[k] += time.perf_counter() - started
        references.append(per_block)

    per_plan = []
    for text in plans:
        switcher.apply(LayerPlan.from_string(text))
        kl, forward, passes = kl_by_reference(model, splits.heldout, references, top_ks)
        default = passes.get(DEFAULT_TOP_K, float("nan"))
        per_plan.append({
            "plan": text, "kl_exact": kl[None], "kl_top_k": {str(k): kl[k] for k in args.top_k},
            "error_top_k": {str(k): kl[None] - kl[k] for k in args.top_k}, "forward_s": forward,
            "kl_pass_exact_s": passes[None], "kl_pass_default_s": default,
            "evaluation_over_forwards": (forward + default) / forward})
        print(f"{text}: done")
    switcher.restore()

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.add_run({
        "max_error_top_k": {str(k): max(p["error_top_k"][str(k)] for p in per_plan) for k in args.top_k},
        "mean_error_top_k": {str(k): sum(p["error_top_k"][str(k)] for p in per_plan) / len(per_plan)
                             for k in args.top_k},
        "reference_build_s": {str(k or "exact"): s for k, s in build.items()},
        "per_plan": per_plan})
    results.table(f"Per plan ({splits.heldout.shape[0]} held-out block(s) of {context} tokens)",
                  ["plan", "KL exact", *(f"top-{k} KL error %" for k in args.top_k), "forwards s",
                   f"KL evaluation / bare forwards (top-{DEFAULT_TOP_K})"],
                  [[p["plan"], p["kl_exact"], *(100 * p["error_top_k"][str(k)] / p["kl_exact"] if p["kl_exact"]
                                                else None for k in args.top_k),
                    p["forward_s"], p["evaluation_over_forwards"]] for p in per_plan])
    results.table("Error KL_exact - KL_top-k over the plans, nats/token", ["top-k", "max", "mean"],
                  [[k, results.median(f"max_error_top_k / {k}"), results.median(f"mean_error_top_k / {k}")]
                   for k in args.top_k])
    if DEFAULT_TOP_K in args.top_k:
        worst = max((100 * p["error_top_k"][str(DEFAULT_TOP_K)] / p["kl_exact"] for p in per_plan if p["kl_exact"]),
                    default=float("nan"))
        results.headline(f"top-{DEFAULT_TOP_K} KL below exact KL at {context:,} tokens, worst plan",
                         round(worst, 1), "%")
    results.note(f"bank {bank}; held-out hash {splits.hashes['heldout']}")
    results.write()


if __name__ == "__main__":
    run(main)
