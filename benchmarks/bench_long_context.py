"""Quality at the workload's context: top-k KL against exact KL, retrieval, evaluation overhead.

    python benchmarks/bench_long_context.py [--needles 8] [--top-k 128,512,1024,2048] [--plans SSS... LLL...]
                                            [key=value ...]     e.g. workload.prefill=4096 data.blocks.heldout=2

The same settings as the CLI: held-out blocks of the workload's context (`data.heldout_seq_len`, null: the
workload's prefill), `data.blocks.heldout` of them, drawn from every source of the whole held-out split
(`data.mix_sources`); the bank is the search's (`layerboost transfer`), loaded (or trained) only when a plan has
a `linear` layer. Per plan: exact KL, each top-k KL and its error (top-k is a lower bound), retrieval exact
match and answer NLL on `--needles` needle rows as long as a held-out block, and the time of the forwards
against that of the metric passes. The original model's logits are computed once and every reference is built
from them, so each plan costs one forward per block and per needle row. Default plans: all-linear, plus two
mixed SmolLM2 plans when the model has their 30 layers.
"""
from __future__ import annotations

import time

import torch

from harness import Script, ints, run
from layerboost.settings import workbench_settings
from layerboost_core.metrics import DEFAULT_TOP_K, needle_stats, reference_of, token_stats
from layerboost_core.needles import make_needles
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


def needle_scores(model, needles) -> tuple[float, float, float]:
    """(exact match, answer NLL, forward seconds) of the model as it is now, one row at a time."""
    width = int(needles.answer_len.max())
    hits, nlls, seconds = [], [], 0.0
    for i in range(needles.input_ids.shape[0]):
        ids = needles.input_ids[i:i + 1]
        started = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=ids[:, :-1], use_cache=False, logits_to_keep=width).logits
        seconds += time.perf_counter() - started
        stats = needle_stats(logits, ids[:, -width:], needles.answer_len[i:i + 1])
        hits.append(stats.hit.item())
        nlls.append(stats.nll.item())
    return sum(hits) / len(hits), sum(nlls) / len(nlls), seconds


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
    script.parser.add_argument("--needles", type=int, default=8, help="retrieval rows per plan")
    script.parser.add_argument("--top-k", type=ints, default=(128, 512, 1024, 2048), help="comma-separated")
    script.parser.add_argument("--plans", nargs="+", default=None,
                               help="compact plans (default: all-linear, and two mixed plans on a 30-layer model)")
    args, cfg = script.parse(argv)
    bench = open_workbench(workbench_settings(cfg))
    model, tokenizer, switcher, splits = bench.model, bench.loaded.tokenizer, bench.switcher, bench.splits
    n = switcher.num_layers
    plans = args.plans or ["L" * n, *(m for m in MIXED if len(m) == n)]
    bank = "none (no linear layer in the plans)"
    if any("L" in text for text in plans):  # training the bank takes minutes: only when a plan uses it
        bank = attach_bank(bench).bank.id
    context = int(splits.heldout.shape[1])
    needles = make_needles(tokenizer, splits.documents["heldout"], context=context, n_examples=args.needles)
    top_ks = [None, *args.top_k]
    print(f"bank {bank}; held-out {tuple(splits.heldout.shape)} (hash {splits.hashes['heldout']}); "
          f"{args.needles} needle rows of {context} tokens (hash {needles.hash}); default top-k {DEFAULT_TOP_K}")

    switcher.restore()
    references, build = [], {k: 0.0 for k in top_ks}
    for targets, logits, _ in block_logits(model, splits.heldout):
        per_block = {}
        for k in top_ks:
            started = time.perf_counter()
            per_block[k] = reference_of(logits, targets, k)
            build[k] += time.perf_counter() - started
        references.append(per_block)
    base_acc, base_nll, _ = needle_scores(model, needles)

    per_plan = []
    for text in plans:
        switcher.apply(LayerPlan.from_string(text))
        kl, forward, passes = kl_by_reference(model, splits.heldout, references, top_ks)
        acc, nll, needle_forward = needle_scores(model, needles)
        default = passes.get(DEFAULT_TOP_K, float("nan"))
        per_plan.append({
            "plan": text, "retrieval_acc": acc, "retrieval_nll": nll, "kl_exact": kl[None],
            "kl_top_k": {str(k): kl[k] for k in args.top_k}, "error_top_k": {str(k): kl[None] - kl[k] for k in args.top_k},
            "forward_s": forward, "needle_forward_s": needle_forward, "kl_pass_exact_s": passes[None],
            "kl_pass_default_s": default,
            "evaluation_over_forwards": (forward + needle_forward + default) / (forward + needle_forward)})
        print(f"{text}: done")
    switcher.restore()

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    results.add_run({
        "max_error_top_k": {str(k): max(p["error_top_k"][str(k)] for p in per_plan) for k in args.top_k},
        "mean_error_top_k": {str(k): sum(p["error_top_k"][str(k)] for p in per_plan) / len(per_plan)
                             for k in args.top_k},
        "all_softmax": {"retrieval_acc": base_acc, "retrieval_nll": base_nll},
        "reference_build_s": {str(k or "exact"): s for k, s in build.items()},
        "per_plan": per_plan})
    results.table(f"Per plan ({splits.heldout.shape[0]} held-out block(s) of {context} tokens, {args.needles} needle "
                  "rows)", ["plan", "KL exact", *(f"top-{k} KL error %" for k in args.top_k), "retrieval_acc",
                            "retrieval_nll", "forwards s", f"full evaluation / bare forwards (top-{DEFAULT_TOP_K})"],
                  [["S" * n, 0.0, *(None for _ in args.top_k), base_acc, base_nll, None, None]]
                  + [[p["plan"], p["kl_exact"], *(100 * p["error_top_k"][str(k)] / p["kl_exact"] if p["kl_exact"]
                                                  else None for k in args.top_k),
                      p["retrieval_acc"], p["retrieval_nll"], p["forward_s"] + p["needle_forward_s"],
                      p["evaluation_over_forwards"]] for p in per_plan])
    results.table("Error KL_exact - KL_top-k over the plans, nats/token", ["top-k", "max", "mean"],
                  [[k, results.median(f"max_error_top_k / {k}"), results.median(f"mean_error_top_k / {k}")]
                   for k in args.top_k])
    if DEFAULT_TOP_K in args.top_k:
        worst = max((100 * p["error_top_k"][str(DEFAULT_TOP_K)] / p["kl_exact"] for p in per_plan if p["kl_exact"]),
                    default=float("nan"))
        results.headline(f"top-{DEFAULT_TOP_K} KL below exact KL at {context:,} tokens, worst plan",
                         round(worst, 1), "%")
    results.note(f"bank {bank}; held-out hash {splits.hashes['heldout']}; needles hash {needles.hash}")
    results.write()


if __name__ == "__main__":
    run(main)
