"""Decode speed of exported folders through plain `generate` vs the project's own cached decode, same run.

    python benchmarks/bench_export.py [--context 1024] [--decode-tokens 32] [--rounds 3] [--threads 1]
                                      [--window 64] [--feature-dim 32] [--sinks 4]

SmolLM2-135M (built in), batch 1, fp32, CPU. Plans: all-linear and half-softmax (S/L alternating). For each
plan, back to back on the same random prompt:
- project: `layerboost_core.bench.measure_plans` (prefill into a HybridCache, then timed one-token forward
  steps; decode tok/s = 1 / median step);
- exported: the folder loaded with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
  and run with plain greedy `model.generate(ids, max_new_tokens=N)` (no cache argument: the remote model's
  own hybrid cache); a stopping criterion stamps the time after every step, so decode tok/s = 1 / median
  interval between steps (a whole generate step: logits processing and bookkeeping included).
`--rounds` rounds; each side's best round is reported (the machine is shared: the best is the least
disturbed). One torch thread by default: on an oversubscribed CPU, multi-threaded steps mostly measure the
other processes (step times of seconds, varying 2x). Speed does not depend on the linear parts' weights,
so they keep their initial values.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from layerboost_core.bench import BenchSettings, measure_plans
from layerboost_core.export import export_hybrid
from layerboost_core.models import load_model
from layerboost_core.patch import PlanSwitcher
from layerboost_core.plan import LayerPlan


class StepClock(StoppingCriteria):
    """Records the time at the end of every generate step; never stops generation."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_step_seconds(model, ids: torch.Tensor, tokens: int) -> tuple[float, str]:
    """(median seconds per decode step of plain greedy `generate`, the cache class it used)."""
    clock = StepClock()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                         return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]  # the first stamp ends the prefill
    return statistics.median(steps), type(out.cache).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--feature-dim", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m", "builtin:smollm2-135m", device="cpu", dtype="float32")
    settings = {"linear": {"window": args.window, "feature_dim": args.feature_dim, "sinks": args.sinks}}
    switcher = PlanSwitcher(loaded.model, settings)
    n = switcher.num_layers
    plans = {"all-linear": LayerPlan.uniform("linear", n),
             "half-softmax": LayerPlan(tuple("softmax" if i % 2 == 0 else "linear" for i in range(n)))}
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    print(f"SmolLM2-135M ({n} layers), cpu fp32, threads={torch.get_num_threads()}, context {args.context}, "
          f"{args.decode_tokens} decode tokens, batch 1, {settings['linear']}, best of {args.rounds} rounds\n")
    with tempfile.TemporaryDirectory() as tmp:
        exported = {}
        for label, plan in plans.items():
            folder = export_hybrid(switcher, plan, loaded.tokenizer, Path(tmp) / label,
                                   {"model": loaded.info, "settings": settings, "bank_id": None})
            exported[label] = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        bench = BenchSettings((args.context,), (1,), args.decode_tokens)
        project = {label: [] for label in plans}
        plain = {label: [] for label in plans}
        cache_kind = {}

        def project_side(label):
            project[label].append(measure_plans(switcher, {label: plans[label]}, bench)[0]["decode_step_s"])

        def exported_side(label):
            seconds, cache_kind[label] = generate_step_seconds(exported[label], ids, args.decode_tokens)
            plain[label].append(seconds)

        for turn in range(args.rounds):  # turns, so that a disturbance of the shared machine hits both sides
            for label in plans:
                for side in (project_side, exported_side)[:: 1 if turn % 2 == 0 else -1]:  # who goes first alternates
                    side(label)
    print(f"{'plan':>13} | project decode tok/s | exported generate tok/s | ratio (exported / project) | cache")
    for label in plans:
        ours, theirs = 1 / min(project[label]), 1 / min(plain[label])
        print(f"{label:>13} | {ours:20.1f} | {theirs:23.1f} | {theirs / ours:26.3f} | {cache_kind[label]}")
    print("\nevery round (tok/s), project / exported:")
    for label in plans:
        print(f"{label:>13}: " + ", ".join(f"{1 / a:.1f} / {1 / b:.1f}" for a, b in zip(project[label], plain[label])))


if __name__ == "__main__":
    main()
