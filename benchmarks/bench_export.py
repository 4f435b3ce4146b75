"""Decode speed of exported folders through plain `generate` vs the project's own cached decode, same run.

    python benchmarks/bench_export.py [--context 1024] [--decode-tokens 32] [--rounds 3] [--threads 1]
                                      [key=value ...]     e.g. attention.linear.window=128 dtype=float32

Model, device, dtype and the `linear` settings are the CLI's (`key=value` overrides); batch 1. Plans:
all-linear and half-softmax (S/L alternating). For each plan, back to back on the same random prompt:
- project: `layerboost_core.bench.measure_plans` (prefill into a HybridCache, then timed one-token forward
  steps; decode tok/s = 1 / median step);
- exported: the folder loaded with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` at the
  same dtype and device, and run with plain greedy `model.generate(ids, max_new_tokens=N)` (no cache argument:
  the remote model's own hybrid cache); a stopping criterion stamps the time after every step, so decode
  tok/s = 1 / median interval between steps (a whole generate step: logits processing and bookkeeping included).
`--rounds` rounds, the sides taking turns (the shared timing helper, order reversed every other round); each
side's best round is reported (the machine is shared: the best is the least disturbed). One torch thread by
default: on an oversubscribed CPU, multi-threaded steps mostly measure the other processes (step times of
seconds, varying 2x). Speed does not depend on the linear parts' weights, so they keep their initial values.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

from harness import Script, open_model, run
from layerboost_core.bench import BenchSettings, measure_plans
from layerboost_core.export import export_hybrid
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import time_rounds


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


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="export", title="Deployable folders: exported generate vs project decode")
    script.parser.add_argument("--context", type=int, default=1024)
    script.parser.add_argument("--decode-tokens", type=int, default=32)
    script.parser.add_argument("--rounds", type=int, default=3)
    script.parser.add_argument("--threads", type=int, default=1)
    args, cfg = script.parse(argv)
    torch.set_num_threads(args.threads)

    loaded, switcher, settings = open_model(cfg)
    n = switcher.num_layers
    plans = {"all-linear": LayerPlan.uniform("linear", n),
             "half-softmax": LayerPlan(tuple("softmax" if i % 2 == 0 else "linear" for i in range(n)))}
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.context), generator=torch.Generator().manual_seed(0)).to(loaded.device)
    print(f"{loaded.info['name']} ({n} layers), {loaded.device} {loaded.dtype}, threads={torch.get_num_threads()}, "
          f"context {args.context}, {args.decode_tokens} decode tokens, batch 1, {settings.options}, "
          f"best of {args.rounds} rounds")
    steps: dict[str, list[float]] = {}
    cache_kind = {}
    with tempfile.TemporaryDirectory() as tmp:
        exported = {}
        for label, plan in plans.items():
            folder = export_hybrid(switcher, plan, loaded.tokenizer, Path(tmp) / label,
                                   {"model": loaded.info, "settings": settings.options, "bank_id": None})
            exported[label] = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=True, dtype=loaded.dtype).to(loaded.device).eval()
        bench = BenchSettings((args.context,), (1,), args.decode_tokens)

        def project_side(label):
            return measure_plans(switcher, {label: plans[label]}, bench)[0]["decode_step_s"]

        def exported_side(label):
            seconds, cache_kind[label] = generate_step_seconds(exported[label], ids, args.decode_tokens)
            return seconds

        sides = {f"{label} / {side}": (lambda f=f, label=label: f(label))
                 for label in plans for side, f in (("project", project_side), ("exported", exported_side))}
        # Sides take turns and the order reverses every other round, so a disturbance of the shared machine
        # hits both; each call's own wall time is not what is reported, but the median step it measured.
        time_rounds(sides, rounds=args.rounds, warmup=0, alternate=True,
                    after=lambda key, seconds: steps.setdefault(key, []).append(seconds))
    results = script.results()
    results.describe(loaded.device, loaded.dtype)
    best = {key: 1 / min(values) for key, values in steps.items()}
    results.add_run({"best_tok_s": best, "step_s": steps, "cache": cache_kind})
    results.table(f"Decode tok/s, best of {args.rounds} rounds (context {args.context}, batch 1, "
                  f"{args.decode_tokens} tokens, {args.threads} thread(s))",
                  ["plan", "project decode tok/s", "exported generate tok/s", "ratio (exported / project)", "cache"],
                  [[label, best[f"{label} / project"], best[f"{label} / exported"],
                    best[f"{label} / exported"] / best[f"{label} / project"], cache_kind[label]] for label in plans])
    results.table("Every round (tok/s), project / exported", ["plan", *(f"round {i + 1}" for i in range(args.rounds))],
                  [[label, *(f"{1 / a:.1f} / {1 / b:.1f}" for a, b in zip(steps[f"{label} / project"],
                                                                          steps[f"{label} / exported"]))]
                   for label in plans])
    results.headline("exported folder's plain generate over the project's decode, all-linear",
                     round(best["all-linear / exported"] / best["all-linear / project"], 3), "x")
    results.write()


if __name__ == "__main__":
    run(main)
