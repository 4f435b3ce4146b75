"""The GPU check, a few minutes when a GPU is lent: what the CPU-only benchmarks cannot tell.

    python benchmarks/gpu_check.py [--models smollm2,llama-1b] [--prefill-contexts 4096,16384]
                                   [--decode-context 16384] [--decode-batch 32] [--decode-tokens 16]
                                   [--proxy-plans 20]

First the `linear` prefill's CUDA path (flex_attention, compiled) against the quadratic reference, fp32.
Per model (SmolLM2-135M, and a Llama-3.2-1B-shaped config with random weights), bf16 on cuda:
prefill time of all-linear against all-softmax at each prefill context (batch 1); decode tok/s at the decode
context x batch, with the KV bytes and the peak memory (torch.cuda.max_memory_allocated) of each plan. Then
evaluations per hour of the search's proxy on SmolLM2 (random softmax / linear / none plans; the `linear`
parts are untrained: speed does not depend on their weights). Without a CUDA device it refuses: one line,
exit status 2.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch

# Llama-3.2-1B's shape (tests/data/configs holds the 8B one).
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
MODELS = ("smollm2", "llama-1b")


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=lambda t: tuple(t.split(",")), default=MODELS,
                        help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--prefill-contexts", type=ints, default=(4096, 16384))
    parser.add_argument("--decode-context", type=int, default=16384)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--proxy-plans", type=int, default=20, help="plans timed for evaluations per hour")
    args = parser.parse_args(argv)
    unknown = set(args.models) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; allowed: {', '.join(MODELS)}")
    return args


def flex_check() -> None:
    """Max abs difference of the CUDA prefill path (flex.py, compiled flex_attention) from naive.py, fp32,
    at 1,024 tokens, window 64, 4 sinks, GQA 2; the CPU test runs flex eagerly, this is the compiled kernel."""
    from layerboost_core.inference.linear_kernels import chunked_prefill
    from layerboost_core.attention.naive import linear_sliding_window_reference

    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=generator)

    q, k, v = rand(2, 8, 1024, 64), rand(2, 4, 1024, 64), rand(2, 4, 1024, 64)
    fq, fk = torch.softmax(rand(2, 8, 1024, 32), -1), torch.softmax(rand(2, 4, 1024, 32), -1)
    gate = torch.rand(8, device="cuda", generator=generator) * 0.9 + 0.05
    with torch.inference_mode():
        got = chunked_prefill(q, k, v, fq, fk, gate, 64, 0.125, 4)  # on CUDA without grad: the flex path
    # the reference on the CPU: its masks are built there
    want = linear_sliding_window_reference(*(x.cpu() for x in (q, k, v, fq, fk, gate)), 64, 0.125, 4)
    error = (got.cpu() - want).abs().max().item()
    print(f"linear prefill, flex path vs reference (fp32): max abs difference {error:.2e} "
          f"({'ok' if error < 1e-4 else 'ABOVE 1e-4'})")


def load(name: str):
    """(model, PlanSwitcher) of `name` in bf16 on cuda, with the project's default `linear` settings."""
    from layerboost.config import compose
    from layerboost_core.models import load_model
    from layerboost_core.patch import PlanSwitcher

    if name == "smollm2":
        model = load_model("smollm2-135m", "builtin:smollm2-135m", device="cuda", dtype="bfloat16").model
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device("cuda"):  # random weights straight on the GPU: no 5 GB fp32 copy on the host
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).eval()
    linear = compose([]).attention.linear
    settings = {"linear": {"window": int(linear.window), "feature_dim": int(linear.feature_dim),
                           "sinks": int(linear.sinks)}}
    return model, PlanSwitcher(model, settings)


def speed(name: str, args: argparse.Namespace) -> None:
    """Prefill ratios and decode throughput / memory of all-linear against all-softmax on one model."""
    from layerboost_core.bench import BenchSettings, measure_plans
    from layerboost_core.plan import LayerPlan

    model, switcher = load(name)
    n = switcher.num_layers
    plans = {"all-softmax": LayerPlan.uniform("softmax", n), "all-linear": LayerPlan.uniform("linear", n)}
    prefill = measure_plans(switcher, plans, BenchSettings(args.prefill_contexts, (1,), 2, 1000.0))
    decode = measure_plans(switcher, plans, BenchSettings((args.decode_context,), (args.decode_batch,),
                                                          args.decode_tokens, 1000.0))
    print(f"\n{name}: {n} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, bf16")
    for context in args.prefill_contexts:
        row = {r["plan_label"]: r for r in prefill if r["context"] == context}
        soft, lin = row["all-softmax"]["prefill_s"], row["all-linear"]["prefill_s"]
        print(f"  prefill {context:>6} tokens: softmax {soft:.3f} s, linear {lin:.3f} s, linear/softmax {lin / soft:.2f}")
    for r in decode:
        print(f"  decode {r['context']} x batch {r['batch']} {r['plan_label']:>11}: {r['decode_tok_s']:8.0f} tok/s, "
              f"KV {r['kv_bytes'] / 2**30:6.2f} GiB, peak {r['peak_bytes'] / 2**30:6.2f} GiB")
    del model, switcher
    torch.cuda.empty_cache()


def proxy_rate(plans: int) -> None:
    """Evaluations per hour of the search's proxy on SmolLM2 (the default proxy settings, on cuda)."""
    from layerboost.config import compose
    from layerboost.settings import workbench_settings
    from layerboost_core.plan import LayerPlan
    from layerboost_core.workbench import open_workbench

    bench = open_workbench(workbench_settings(compose(["device=cuda", "dtype=bfloat16"])), with_bank=False)
    proxy = bench.proxy_evaluator()
    n, rng = bench.switcher.num_layers, random.Random(0)
    chosen = [LayerPlan(tuple(rng.choice(["softmax", "linear", "none"]) for _ in range(n))) for _ in range(plans + 1)]
    bench.switcher.apply(chosen[0])
    proxy.evaluate()  # warm-up: kernel selection and allocations
    torch.cuda.synchronize()
    started = time.perf_counter()
    for plan in chosen[1:]:
        bench.switcher.apply(plan)
        proxy.evaluate()  # returns Python floats: synchronised
    seconds = (time.perf_counter() - started) / plans
    print(f"\nproxy on SmolLM2: {seconds:.3f} s per plan = {3600 / seconds:.0f} evaluations per hour per GPU "
          f"({plans} random plans, {bench.splits.heldout.shape[0]} held-out blocks)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it where a GPU is lent",
              file=sys.stderr)
        sys.exit(2)
    from layerboost_core.logs import quiet_libraries

    quiet_libraries()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    flex_check()
    for name in args.models:
        speed(name, args)
    proxy_rate(args.proxy_plans)


if __name__ == "__main__":
    main()
