"""Prefill speed of all-softmax, all-linear, all-none and a core-free ceiling, measured side by side.

    python benchmarks/bench_prefill.py [--lengths 1024,4096] [--repeats 5] [--runs 1] [--training-kernel]
                                       [key=value ...]  e.g. attention.linear.window=128 model=qwen2.5-0.5b device=cuda

Model, device, dtype and the `linear` settings (window, feature map, sinks) are the CLI's, from the same
`key=value` overrides. Core-free keeps every layer's q/k/v/o projections and RoPE but skips the attention
computation itself: the ceiling any replacement of the attention core could reach. Variants are timed
round-robin (one forward of batch 1 each per round, one warm-up round first, `--repeats` rounds counted) so
machine noise hits them alike; speed-ups are the median of per-round ratios to all-softmax. `--training-kernel`
adds all-linear run through the `linear` prefill's training body (`linear_kernels._differentiable_prefill`, which
attention transfer differentiates) in place of its inference body: what the inference body saves, side by side
(on a CPU; on CUDA both variants run the FlexAttention path).
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

from harness import Script, ints, open_model, run
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import round_ratios, time_rounds

VARIANTS = ("softmax", "linear", "none", "core-free")
TRAINING_KERNEL = "linear-training-kernel"


class CoreFreeAttention(nn.Module):
    """Benchmark-only: projections and RoPE as usual, then o_proj(q) instead of attention."""

    def __init__(self, attn, family):
        super().__init__()
        self.attn, self.family = attn, family

    def forward(self, hidden_states, position_embeddings=None, **kwargs):
        q, k, v = self.family.project_qkv(self.attn, hidden_states, position_embeddings)
        return self.attn.o_proj(q.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def measure(loaded, switcher, lengths, repeats: int, variants=VARIANTS) -> dict:
    """One run: per length, every round's seconds per variant, their medians and per-round speed-ups."""
    from layerboost_core.inference import linear_kernels

    model, n = loaded.model, switcher.num_layers
    core_free = [CoreFreeAttention(attn, switcher.family) for attn in switcher.original]
    inference_body = linear_kernels._inference_prefill

    def use(variant: str) -> None:
        # chunked_prefill looks its inference body up at call time: benchmark-only, restored for every other variant
        linear_kernels._inference_prefill = (linear_kernels._differentiable_prefill if variant == TRAINING_KERNEL
                                             else inference_body)
        if variant == TRAINING_KERNEL:
            switcher.apply(LayerPlan.uniform("linear", n))
        elif variant == "core-free":
            switcher.restore()
            for layer, module in zip(switcher.layers, core_free):
                layer.self_attn = module
        else:
            switcher.apply(LayerPlan.uniform(variant, n))

    out = {}
    for length in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), device=loaded.device)
        with torch.inference_mode():
            try:
                times = time_rounds({v: (lambda: model.model(ids)) for v in variants}, rounds=repeats, warmup=1,
                                    before=use, device=loaded.device)
            finally:
                linear_kernels._inference_prefill = inference_body
        switcher.restore()
        median = {v: statistics.median(t) for v, t in times.items()}
        ceiling = median["softmax"] - median["core-free"]
        out[str(length)] = {
            "median_s": median,
            "speedup": {v: statistics.median(1 / r for r in ratios)
                        for v, ratios in round_ratios(times, "softmax").items() if v != "softmax"},
            "share_of_ceiling": (median["softmax"] - median["linear"]) / ceiling if ceiling > 0 else float("nan"),
            "rounds_s": times,
        }
        if TRAINING_KERNEL in times:  # what the inference body saves: per round, training body's time over its own
            out[str(length)]["inference_body_speedup"] = statistics.median(
                a / b for a, b in zip(times[TRAINING_KERNEL], times["linear"]))
    return out


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="prefill", title="Prefill speed", runs=True)
    script.parser.add_argument("--lengths", type=ints, default=(1024, 4096), help="comma-separated, e.g. 1024,4096")
    script.parser.add_argument("--repeats", type=int, default=5, help="counted rounds per run")
    script.parser.add_argument("--training-kernel", action="store_true",
                               help="add all-linear through the linear prefill's training body")
    args, cfg = script.parse(argv)
    variants = VARIANTS + ((TRAINING_KERNEL,) if args.training_kernel else ())
    loaded, switcher, settings = open_model(cfg)
    print(f"{loaded.name} on {loaded.device}, {loaded.dtype}, threads={torch.get_num_threads()}, "
          f"linear {settings.options.get('linear')}, {args.repeats} rounds x {args.runs} run(s)")
    results = script.results()
    results.describe(loaded.device, loaded.dtype)
    for index in range(args.runs):
        results.add_run(measure(loaded, switcher, args.lengths, args.repeats, variants))
        print(f"run {index + 1}/{args.runs} done")

    rows = []
    for length in args.lengths:
        m = {v: results.median(f"{length} / median_s / {v}") for v in variants}
        s = {v: results.median(f"{length} / speedup / {v}") for v in variants[1:]}
        rows.append([length, *(m[v] for v in variants), *(s[v] for v in variants[1:]),
                     results.median(f"{length} / share_of_ceiling")])
    results.table(f"Prefill seconds of one forward (batch 1; median of {args.repeats} rounds, median over "
                  f"{args.runs} run(s)) and speed-up over all-softmax (median of per-round ratios)",
                  ["tokens", *(f"{v} s" for v in variants), *(f"{v} speed-up" for v in variants[1:]),
                   "(T(softmax) - T(linear)) / (T(softmax) - T(core-free))"], rows)
    if args.training_kernel:  # every length's figure is in the summary ("<length> / inference_body_speedup")
        shortest = min(args.lengths)
        results.headline(f"all-linear prefill at {shortest:,} tokens: the training body's time over the inference "
                         "body's (slowest run)",
                         round(min(r[str(shortest)]["inference_body_speedup"] for r in results.runs), 3), "x")
    longest = max(args.lengths)
    results.headline(f"all-linear prefill speed-up over all-softmax at {longest:,} tokens",
                     round(results.median(f"{longest} / speedup / linear"), 2), "x")
    results.note(f"{loaded.info['name']} ({switcher.num_layers} layers), linear settings "
                 f"{settings.options.get('linear')}, torch threads {torch.get_num_threads()}")
    results.write()


if __name__ == "__main__":
    run(main)
