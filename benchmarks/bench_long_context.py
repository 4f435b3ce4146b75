"""Quality at the workload's context on SmolLM2: top-k KL against exact KL, retrieval, evaluation overhead.

    python benchmarks/bench_long_context.py [--context 2048] [--blocks 2] [--needles 8] [--top-k 128 512 1024 2048]
                                            [--plans SSS... LLL...]

Held-out blocks of `--context` tokens drawn from every source of the whole held-out split
(make_splits(heldout_seq_len=..., mix_sources=True)); the bank is the default one (`layerboost transfer`),
loaded (or trained) only when a plan has a `linear` layer.
Prints, per plan: exact KL, each top-k KL and its error (top-k is a lower bound), retrieval exact match and
answer NLL on `--needles` needle rows, and the time of the forwards against that of the metric passes.
The original model's logits are computed once and every reference is built from them, so each plan costs
one forward per block and per needle row.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from layerboost_core.data import make_splits
from layerboost_core.metrics import DEFAULT_TOP_K, needle_stats, reference_of, token_stats
from layerboost_core.models import load_model
from layerboost_core.needles import make_needles
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan
from layerboost_core.transfer import TransferSettings, load_or_build_bank

# The default config's attention settings (conf/config.yaml): the bank is keyed on them.
OPTION_SETTINGS = {"linear": {"window": 64, "feature_dim": 32, "sinks": 4}}
MIXED = ("LLSSSSSLSSSLLLSSLSSLSSLSLLLLLL", "SSSSSNNNNSSSSSSSSNSSSSSSSNNSSN")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--needles", type=int, default=8)
    parser.add_argument("--top-k", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--plans", nargs="+", default=None, help="compact plans (default: all-linear and two mixed)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    loaded = load_model("smollm2-135m", "builtin:smollm2-135m", "cpu", "float32", "HuggingFaceTB/SmolLM2-135M-Instruct")
    model, tokenizer = loaded.model, loaded.tokenizer
    splits = make_splits(tokenizer, blocks={"calibration": 8, "train": None, "heldout": args.blocks},
                         heldout_seq_len=args.context, mix_sources=True)
    switcher = PlanSwitcher(model, OPTION_SETTINGS)
    n = switcher.num_layers
    plans = args.plans or ["L" * n, *MIXED]
    bank = "none (no linear layer in the plans)"
    if any("L" in text for text in plans):  # training the bank takes minutes: only when a plan uses it
        bank = load_or_build_bank(switcher, loaded.info, splits, OPTION_SETTINGS, TransferSettings(), progress=False).id
    needles = make_needles(tokenizer, splits.documents["heldout"], context=args.context, n_examples=args.needles)
    top_ks = [None, *args.top_k]
    print(f"bank {bank}; held-out {tuple(splits.heldout.shape)} (hash {splits.hashes['heldout']}); "
          f"{args.needles} needle rows of {args.context} tokens (hash {needles.hash}); default top-k {DEFAULT_TOP_K}")

    switcher.restore()
    references, build = [], {k: 0.0 for k in top_ks}
    for targets, logits, _ in block_logits(model, splits.heldout):
        per_block = {}
        for k in top_ks:
            started = time.perf_counter()
            per_block[k] = reference_of(logits, targets, k)
            build[k] += time.perf_counter() - started
        references.append(per_block)
    print("reference build s: " + ", ".join(f"{k or 'exact'} {s:.2f}" for k, s in build.items()))
    acc, nll, _ = needle_scores(model, needles)
    print(f"\n{'S' * n}  retrieval_acc {acc:.3f}  retrieval_nll {nll:.3f}")

    errors: dict[int, list[float]] = {k: [] for k in args.top_k}
    for text in plans:
        switcher.apply(LayerPlan.from_string(text))
        kl, forward, passes = kl_by_reference(model, splits.heldout, references, top_ks)
        acc, nll, needle_forward = needle_scores(model, needles)
        exact = kl[None]
        print(f"{text}  retrieval_acc {acc:.3f}  retrieval_nll {nll:.3f}  kl exact {exact:.4f}")
        for k in args.top_k:
            errors[k].append(exact - kl[k])
            print(f"    top-{k:<4d} kl {kl[k]:.4f}  error {exact - kl[k]:.2e} ({(exact - kl[k]) / exact:.2%})")
        default = passes[DEFAULT_TOP_K] if DEFAULT_TOP_K in passes else float("nan")
        print(f"    seconds: forwards {forward + needle_forward:.1f} (blocks {forward:.1f}, needles {needle_forward:.1f}); "
              f"KL passes exact {passes[None]:.2f}, top-{DEFAULT_TOP_K} {default:.2f}; "
              f"full evaluation / bare forwards {(forward + needle_forward + default) / (forward + needle_forward):.3f}")
    switcher.restore()
    print("\nerror |KL_topk - KL_exact| over the plans, nats/token:")
    for k, values in errors.items():
        print(f"    top-{k:<4d} max {max(values):.2e}  mean {sum(values) / len(values):.2e}")


if __name__ == "__main__":
    main()
