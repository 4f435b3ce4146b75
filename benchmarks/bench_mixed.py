"""The per-head `mixed` options against layer-level options only: what each option costs, and what a search
finds with and without them.

    python benchmarks/bench_mixed.py [--contexts 2048,4096] [--costs-only] [key=value ...]

1. Per-option cost: every option's measured per-layer time above `none` (all-`option` plans taking turns, the
   cost model's own timing) at the workload and at each `--contexts` prefill, and the KV bytes one layer keeps
   per sequence. A `mixed<k>` option the model cannot run (fewer than k + 1 KV heads) is said, not timed.
2. Unless `--costs-only`: two floor-on searches with the given overrides, one over softmax/linear/none and one
   with mixed1/mixed2 too (`space.prune_dominated=false` in both, so the options themselves are compared),
   each confirming its picks as the default run does. The fastest plan keeping the retrieval and quality floors
   in each (its answer.json, offered as a best file or not) and all-softmax then take turns in one timing
   session (`--rounds` rounds after a warm-up) at the workload, and in a decode run at `bench.contexts[-1]` x
   `bench.batches[-1]` (`bench.decode_tokens` cached steps): prefill share of all-softmax beside the search's own
   measurement and prediction, decode tokens/s and KV bytes.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from harness import Script, ints, run
from layerboost.settings import bench_settings, search_settings
from layerboost_core.bench import measure_plans
from layerboost_core.inference.mixed_attention import MIXED_OPTIONS
from layerboost_core.plan import LayerPlan
from layerboost_core.timing import model_device, round_ratios, summarize, time_plans
from layerboost_search.pipeline import prepare, run_search
from layerboost_surrogates.cost_model import kv_bytes_per_sequence, measure_uniform, run_request

LAYER_ONLY = ["softmax", "linear", "none"]


def fastest_keeping_floors(run_dir: Path) -> tuple[str, dict] | None:
    """(plan, evidence) of the fastest plan that keeps the floors, as the search's answer.json names it (offered
    as a best file or not: a plan no latency target fits is still the fastest one keeping retrieval), if any."""
    fastest = json.loads((run_dir / "answer.json").read_text())["fastest_keeping_floors"]
    if fastest is None:
        return None
    latency = fastest["latency_share_measured"] or {}
    return fastest["plan"], {"trial": fastest["trial"], "fidelity": fastest["fidelity"],
                             "measured_share": latency.get("value"), "measured_share_high": latency.get("hi"),
                             "predicted_share": fastest["latency_share_predicted"], "kl": fastest["kl"]["value"],
                             "retrieval_acc": (fastest["retrieval_acc"] or {}).get("value")}


def main(argv=None) -> None:
    script = Script(__doc__, __file__, result="mixed", title="Per-head mixed options against layer-level ones")
    script.parser.add_argument("--contexts", type=ints, default=(2048, 4096), help="prefill lengths of the costs")
    script.parser.add_argument("--costs-only", action="store_true", help="per-option costs only, no searches")
    script.parser.add_argument("--rounds", type=int, default=5, help="rounds of the side-by-side prefill timing")
    args, cfg = script.parse(argv)
    settings = search_settings(cfg)
    every = {**settings.space, "options": [*LAYER_ONLY, *MIXED_OPTIONS], "prune_dominated": False}
    prepared = prepare(dataclasses.replace(settings, space=every))
    bench, space = prepared.bench, prepared.space
    n, config = bench.switcher.num_layers, bench.model.config
    device = model_device(bench.model)
    options = list(space.options)
    costs = {}
    for context in args.contexts:
        workload = dataclasses.replace(settings.workload, prefill=context)
        uniform = measure_uniform(bench.switcher, workload, options, device)
        costs[context] = {o: (uniform[o] - uniform["none"]) / n for o in options}
    kv = {o: kv_bytes_per_sequence(LayerPlan((o,)), config, bench.settings.options, settings.workload.context,
                                   bench.model.dtype.itemsize) for o in options}

    results = script.results()
    results.describe(bench.loaded.device, bench.loaded.dtype)
    measured = {"costs_ms_per_layer": {str(c): {o: v * 1e3 for o, v in per.items()} for c, per in costs.items()},
                "kv_bytes_per_layer": kv, "not_run": prepared.notes}
    results.table(f"Per-layer time above `none` (ms; all-option plans taking turns, {settings.workload.repeats} "
                  f"rounds) and KV bytes of one layer per sequence at {settings.workload.context:,} tokens",
                  ["option", *(f"ms at {c:,}" for c in args.contexts), "KV bytes"],
                  [[o, *(costs[c][o] * 1e3 for c in args.contexts), kv[o]] for o in options])
    for note in prepared.notes:
        results.note(f"not run: {note}")
    if args.costs_only:
        results.add_run(measured)
        results.write()
        return

    found = {}
    for label, chosen in (("layer options", LAYER_ONLY), ("with mixed", options)):
        space_settings = {**settings.space, "options": chosen, "prune_dominated": False}
        run_dir = run_search(dataclasses.replace(settings, space=space_settings))
        found[label] = fastest_keeping_floors(run_dir)
        print(f"{label}: {found[label]}")
    plans = {"all-softmax": LayerPlan.uniform("softmax", n)}
    plans.update({label: LayerPlan.from_string(got[0]) for label, got in found.items() if got is not None})
    ids = torch.randint(0, config.vocab_size, (settings.workload.batch, settings.workload.prefill)).to(device)
    times = time_plans(bench.switcher, plans, lambda model: run_request(model, ids, settings.workload.decode),
                       rounds=args.rounds, warmup=1, alternate=True)
    shares = summarize(times, "all-softmax")
    decode = bench_settings(cfg)
    decode = dataclasses.replace(decode, contexts=decode.contexts[-1:], batches=decode.batches[-1:])
    decode_rows = measure_plans(bench.switcher, plans, decode)
    measured.update({"fastest_keeping_floors": found, "prefill_seconds": times,
                     "prefill_ratios": round_ratios(times, "all-softmax"), "decode": decode_rows})
    results.add_run(measured)
    by_label = {r["plan_label"]: r for r in decode_rows}
    base = by_label["all-softmax"]
    evidence = {label: (found.get(label) or (None, {}))[1] for label in plans}
    results.table(f"The fastest plan keeping the floors in each search, and all-softmax, taking turns ({args.rounds} "
                  f"rounds at {settings.workload.prefill:,} tokens; decode at {decode.contexts[0]:,} x batch "
                  f"{decode.batches[0]})",
                  ["search space", "plan", "prefill share (median)", "[fastest, slowest round]",
                   "in the search: measured [high end]", "predicted", "KL (pick rung)", "retrieval (pick rung)",
                   "decode tok/s", "decode vs all-softmax", "KV MiB", "KV vs all-softmax"],
                  [[label, str(plan), shares[label]["ratio"]["median"],
                    f"[{shares[label]['ratio']['min']:.3f}, {shares[label]['ratio']['max']:.3f}]",
                    (f"{evidence[label]['measured_share']:.3f} [{evidence[label]['measured_share_high']:.3f}]"
                     if evidence[label].get("measured_share") is not None else None),
                    evidence[label].get("predicted_share"), evidence[label].get("kl"),
                    evidence[label].get("retrieval_acc"),
                    by_label[label]["decode_tok_s"], by_label[label]["decode_tok_s"] / base["decode_tok_s"],
                    by_label[label]["kv_bytes"] / 2**20, by_label[label]["kv_bytes"] / base["kv_bytes"]]
                   for label, plan in plans.items()])
    for label in ("layer options", "with mixed"):
        if found.get(label) is None:
            results.note(f"{label}: no plan but the original keeps the floors")
    if "layer options" in plans and "with mixed" in plans:
        gain = shares["layer options"]["ratio"]["median"] - shares["with mixed"]["ratio"]["median"]
        results.headline("fastest retrieval-keeping plan: layer-only minus with-mixed, share of all-softmax latency",
                         round(gain, 3))
    for label in ("layer options", "with mixed"):
        if label in plans:
            row = by_label[label]
            results.headline(f"fastest retrieval-keeping plan ({label}): KV bytes over all-softmax's",
                             round(row["kv_bytes"] / base["kv_bytes"], 3), "x")
            results.headline(f"fastest retrieval-keeping plan ({label}): decode tokens/s over all-softmax's at "
                             f"{decode.contexts[0]:,} x batch {decode.batches[0]}",
                             round(row["decode_tok_s"] / base["decode_tok_s"], 3), "x")
    results.write()


if __name__ == "__main__":
    run(main)
