"""The GPU check, a few minutes when a GPU is lent: what the CPU-only benchmarks cannot tell.

    python benchmarks/gpu_check.py [--models smollm2,llama-1b] [--prefill-contexts 4096,16384]
                                   [--decode-context 16384] [--decode-batch 32] [--decode-tokens 16]
                                   [--proxy-plans 20] [key=value ...]

First the `linear` prefill's CUDA path (flex_attention, compiled) against the quadratic reference, fp32.
Per model (SmolLM2-135M, and a Llama-3.2-1B-shaped config with random weights), bf16 on cuda:
prefill time of all-linear against all-softmax at each prefill context (batch 1); decode tok/s at the decode
context x batch, with the KV bytes and the peak memory (torch.cuda.max_memory_allocated) of each plan. Then
evaluations per hour of the search's proxy on SmolLM2 (random softmax / linear / none plans; the `linear`
parts are untrained: speed does not depend on their weights). The `linear` settings and the proxy's settings
are the CLI's (`key=value` overrides); the proxy runs at the config's device and dtype (auto: cuda, bfloat16).
Results file `gpu_check`. Without a CUDA device it refuses: one line, exit status 2.
"""
from __future__ import annotations

import random
import time

import torch

from harness import Script, ints, run

# Llama-3.2-1B's shape (tests/data/configs holds the 8B one).
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)
MODELS = ("smollm2", "llama-1b")


def models(text: str) -> tuple[str, ...]:
    import argparse

    names = tuple(text.split(","))
    unknown = set(names) - set(MODELS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(sorted(unknown))}; allowed: {', '.join(MODELS)}")
    return names


def flex_check() -> float:
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
    return error


def load(name: str, options: dict):
    """(model, PlanSwitcher) of `name` in bf16 on cuda, with the config's option settings."""
    from layerboost_core.models import load_model
    from layerboost_core.patch import PlanSwitcher

    if name == "smollm2":
        model = load_model("smollm2-135m", "builtin:smollm2-135m", device="cuda", dtype="bfloat16").model
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device("cuda"):  # random weights straight on the GPU: no 5 GB fp32 copy on the host
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).eval()
    return model, PlanSwitcher(model, options)


def speed(name: str, args, options: dict) -> dict:
    """Prefill ratios and decode throughput / memory of all-linear against all-softmax on one model."""
    from layerboost_core.bench import BenchSettings, measure_plans
    from layerboost_core.plan import LayerPlan

    model, switcher = load(name, options)
    n = switcher.num_layers
    plans = {"all-softmax": LayerPlan.uniform("softmax", n), "all-linear": LayerPlan.uniform("linear", n)}
    prefill = measure_plans(switcher, plans, BenchSettings(args.prefill_contexts, (1,), 2, 1000.0))
    decode = measure_plans(switcher, plans, BenchSettings((args.decode_context,), (args.decode_batch,),
                                                          args.decode_tokens, 1000.0))
    out = {"layers": n, "parameters": sum(p.numel() for p in model.parameters()), "prefill": {}, "decode": {}}
    for context in args.prefill_contexts:
        row = {r["plan_label"]: r for r in prefill if r["context"] == context}
        soft, lin = row["all-softmax"]["prefill_s"], row["all-linear"]["prefill_s"]
        out["prefill"][str(context)] = {"softmax_s": soft, "linear_s": lin, "linear_over_softmax": lin / soft}
    for r in decode:
        out["decode"][r["plan_label"]] = {"tok_s": r["decode_tok_s"], "kv_gib": r["kv_bytes"] / 2**30,
                                          "peak_gib": r["peak_bytes"] / 2**30}
    print(f"{name}: done")
    del model, switcher
    torch.cuda.empty_cache()
    return out


def proxy_rate(cfg, plans: int) -> dict:
    """Evaluations per hour of the search's proxy on the config's model (default SmolLM2; cuda, bf16)."""
    from layerboost.settings import workbench_settings
    from layerboost_core.plan import LayerPlan
    from layerboost_core.workbench import open_workbench

    bench = open_workbench(workbench_settings(cfg), with_bank=False)
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
    bench.switcher.restore()
    return {"model": bench.info["name"], "seconds_per_plan": seconds, "evaluations_per_hour": 3600 / seconds,
            "heldout_blocks": int(bench.splits.heldout.shape[0]), "heldout_tokens": int(bench.splits.heldout.shape[1]),
            "dtype": str(bench.loaded.dtype)}


def main(argv=None) -> None:
    from layerboost.settings import workbench_settings
    from layerboost_core.errors import UserError

    script = Script(__doc__, __file__, result="gpu_check", title="GPU check")
    parser = script.parser
    parser.add_argument("--models", type=models, default=MODELS, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--prefill-contexts", type=ints, default=(4096, 16384))
    parser.add_argument("--decode-context", type=int, default=16384)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--proxy-plans", type=int, default=20, help="plans timed for evaluations per hour")
    args, cfg = script.parse(argv)
    if not torch.cuda.is_available():
        raise UserError("device: no CUDA device here (torch.cuda.is_available() is False); run gpu_check where a "
                        "GPU is lent")
    options = workbench_settings(cfg).options
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    flex_error = flex_check()
    speeds = {name: speed(name, args, options) for name in args.models}
    proxy = proxy_rate(cfg, args.proxy_plans)

    results = script.results()
    results.describe(torch.device("cuda"), torch.bfloat16)
    results.add_run({"flex_max_abs_difference": flex_error, "models": speeds, "proxy": proxy})
    results.table("Linear prefill, CUDA flex path against the quadratic reference (fp32, 1,024 tokens)",
                  ["max abs difference", "within 1e-4"], [[flex_error, flex_error < 1e-4]])
    results.table("Prefill, batch 1 (bf16)", ["model", "tokens", "softmax s", "linear s", "linear / softmax"],
                  [[name, int(c), p["softmax_s"], p["linear_s"], p["linear_over_softmax"]]
                   for name, s in speeds.items() for c, p in s["prefill"].items()])
    results.table(f"Decode at {args.decode_context:,} tokens x batch {args.decode_batch} (bf16)",
                  ["model", "plan", "tok/s", "KV GiB", "peak GiB"],
                  [[name, plan, d["tok_s"], d["kv_gib"], d["peak_gib"]]
                   for name, s in speeds.items() for plan, d in s["decode"].items()])
    results.table("Proxy evaluations", ["model", "seconds per plan", "evaluations per hour per GPU", "held-out",
                                        "dtype"],
                  [[proxy["model"], proxy["seconds_per_plan"], round(proxy["evaluations_per_hour"]),
                    f"{proxy['heldout_blocks']} x {proxy['heldout_tokens']} tokens", proxy["dtype"]]])
    longest = str(max(args.prefill_contexts))
    for name, s in speeds.items():
        results.headline(f"{name}: all-linear prefill time over all-softmax's at {int(longest):,} tokens (GPU)",
                         round(s["prefill"][longest]["linear_over_softmax"], 3), "x")
        decode = s["decode"]
        results.headline(f"{name}: all-linear decode speed-up at {args.decode_context:,} x {args.decode_batch} (GPU)",
                         round(decode["all-linear"]["tok_s"] / decode["all-softmax"]["tok_s"], 2), "x")
    results.headline("proxy evaluations per hour per GPU", round(proxy["evaluations_per_hour"]), "per hour")
    results.write()


if __name__ == "__main__":
    run(main)
