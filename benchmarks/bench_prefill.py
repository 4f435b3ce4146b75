"""Prefill speed of all-softmax, all-linear, all-none and a core-free ceiling, measured side by side.

    python benchmarks/bench_prefill.py [--lengths 1024,4096] [--repeats 5] [--window 64] [--feature-dim 32]

Core-free keeps every layer's q/k/v/o projections and RoPE but skips the attention computation itself:
the ceiling any replacement of the attention core could reach. Variants are timed round-robin (one
forward each per round, median over rounds) so machine noise hits them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from layerboost_core.models import load_model
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan


class CoreFreeAttention(nn.Module):
    """Benchmark-only: projections and RoPE as usual, then o_proj(q) instead of attention."""

    def __init__(self, attn, family):
        super().__init__()
        self.attn, self.family = attn, family

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        q, k, v = self.family.project_qkv(self.attn, hidden_states, position_embeddings)
        return self.attn.o_proj(q.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")], default=[1024, 4096],
                        help="comma-separated, e.g. 1024,4096")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=32)
    args = parser.parse_args()

    lm = load_model("smollm2-135m", "builtin:smollm2-135m", device="cpu", dtype="float32")
    switcher = PlanSwitcher(lm.model, {"linear": {"window": args.window, "feature_dim": args.feature_dim}})
    n = switcher.num_layers
    core_free = [CoreFreeAttention(attn, switcher.family) for attn in switcher.original]

    def use(variant: str) -> None:
        if variant == "core-free":
            switcher.restore()
            for layer, module in zip(switcher.layers, core_free):
                layer.self_attn = module
        else:
            switcher.apply(LayerPlan.uniform(variant, n))

    variants = ["softmax", "linear", "none", "core-free"]
    print(f"threads={torch.get_num_threads()} window={args.window} feature_dim={args.feature_dim} "
          f"repeats={args.repeats} (median seconds of one forward, batch 1)")
    for length in args.lengths:
        ids = torch.randint(0, lm.model.config.vocab_size, (1, length))
        times = {v: [] for v in variants}
        with torch.inference_mode():
            for variant in variants:  # warm-up
                use(variant)
                lm.model.model(ids)
            for _ in range(args.repeats):
                for variant in variants:
                    use(variant)
                    start = time.perf_counter()
                    lm.model.model(ids)
                    times[variant].append(time.perf_counter() - start)
        t = {v: statistics.median(x) for v, x in times.items()}
        ceiling = t["softmax"] - t["core-free"]
        gained = (t["softmax"] - t["linear"]) / ceiling if ceiling > 0 else float("nan")
        print(f"\nprefill {length} tokens: " + "  ".join(f"T({v})={t[v]:.3f}s" for v in variants))
        print(f"  speed-up vs softmax: linear {t['softmax'] / t['linear']:.2f}x, none {t['softmax'] / t['none']:.2f}x, "
              f"core-free {t['softmax'] / t['core-free']:.2f}x")
        print(f"  (T(softmax) - T(linear)) / (T(softmax) - T(core-free)) = {gained:.2f}")
    switcher.restore()


if __name__ == "__main__":
    main()
