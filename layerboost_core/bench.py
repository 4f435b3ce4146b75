"""Measured speed and memory of plans at workloads, side by side in one run (`layerboost bench plan=...`).

For each context and batch, every plan gets one prefill of `context` random tokens into a `HybridCache`
(timed: the prefill latency) and then `decode_tokens` cached one-token greedy steps (each timed; decode
speed = batch / median step time). Plans take turns inside each (context, batch), so drifts of the machine
hit them alike. Memory:

- KV bytes: what the cache holds after the last step, read from the cache itself.
- peak memory: `torch.cuda.max_memory_allocated` over prefill + decode on CUDA; on CPU, weights + KV bytes
  (torch has no CPU allocator statistics; activations are not counted).
- max batch: (budget - weight bytes) // KV bytes per sequence at context + decode_tokens (KV only).
- throughput at max batch: measured when the max batch is one of the measured batches; otherwise estimated
  from a least-squares line step_time(batch) = a + c * batch through the measured batches of that plan and
  context (the `throughput_source` column says which).
"""
from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import HybridCache
from .cache_dir import atomic_path
from .errors import UserError
from .plan import LayerPlan
from .timing import time_rounds

log = logging.getLogger(__name__)

BASELINE = "all-softmax"


@dataclass(frozen=True)
class BenchSettings:
    contexts: tuple[int, ...] = (1024, 4096)
    batches: tuple[int, ...] = (1, 8)
    decode_tokens: int = 32
    memory_budget_gb: float = 8.0
    seed: int = 0

    def __post_init__(self):
        for name in ("contexts", "batches"):
            values = getattr(self, name)
            if not values or any(int(v) != v or v < 1 for v in values):
                raise UserError(f"bench.{name}: {list(values)!r} must be a non-empty list of positive integers")
        if self.decode_tokens < 1:
            raise UserError(f"bench.decode_tokens: {self.decode_tokens} must be >= 1")
        if not self.memory_budget_gb > 0:
            raise UserError(f"bench.memory_budget_gb: {self.memory_budget_gb} must be > 0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _release(device: torch.device) -> None:
    """Free what the previous plan's cache held (and, on CUDA, reset the peak) before the next plan runs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def prefill_into_cache(model, ids: torch.Tensor) -> tuple[HybridCache, torch.Tensor]:
    """`ids` (B, S) prefilled into a fresh HybridCache for the plan in place: (cache, last logits (B, 1, V))."""
    cache = HybridCache(model)
    return cache, model(ids, cache=cache, logits_to_keep=1).logits  # no full-vocab logits per token


def decode_steps(model, cache: HybridCache, logits: torch.Tensor, decode_tokens: int) -> dict:
    """Greedy cached one-token steps after a prefill, each timed; what the cache holds at the end."""
    device = logits.device
    steps = []
    for _ in range(decode_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        _sync(device)
        start = time.perf_counter()
        logits = model(token, cache=cache, logits_to_keep=1).logits
        _sync(device)
        steps.append(time.perf_counter() - start)
    result = {"decode_step_s": statistics.median(steps), "kv_bytes": cache.kv_bytes(),
              "tokens_cached": cache.get_seq_length()}
    if device.type == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def measure_turns(switcher, plans: dict[str, LayerPlan], ids: torch.Tensor, decode_tokens: int) -> dict[str, dict]:
    """Per plan label: the prefill of `ids` (timed by the shared timing helper, plans taking turns) and then,
    untimed by it, `decode_tokens` timed decode steps of that plan before the next plan's prefill."""
    model, device = switcher.model, ids.device
    measured: dict[str, dict] = {}

    def after(label, state):
        measured[label] = decode_steps(model, *state, decode_tokens)

    def before(label):
        switcher.apply(plans[label])
        _release(device)

    with torch.inference_mode():
        times = time_rounds({label: (lambda: prefill_into_cache(model, ids)) for label in plans}, rounds=1,
                            warmup=0, before=before, after=after, device=device)
    for label, seconds in times.items():
        measured[label]["prefill_s"] = seconds[0]
    return measured


def step_time_at(batch: int, measured: dict[int, float]) -> float:
    """Decode step time at `batch` from a least-squares line through the measured (batch, seconds) points
    (a single point: proportional to the batch, which overestimates the time)."""
    xs, ys = list(measured), list(measured.values())
    if len(xs) == 1:
        return ys[0] * batch / xs[0]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    # A step never gets faster with more sequences: floor the line at the slowest smaller measured batch.
    floor = max((y for x, y in zip(xs, ys) if x <= batch), default=0.0)
    return max(intercept + slope * batch, floor)


def measure_plans(switcher, plans: dict[str, LayerPlan], settings: BenchSettings,
                  progress: bool = False) -> list[dict]:
    """Rows of measurements, one per (context, batch, plan label); the switcher is restored afterwards."""
    model = switcher.model
    device = model.get_input_embeddings().weight.device
    vocab = model.config.vocab_size
    weights = weight_bytes(model)
    budget = int(settings.memory_budget_gb * 1024**3)
    generator = torch.Generator().manual_seed(settings.seed)
    # One small untimed round first: first calls pay for allocations and kernel selection, not the plan.
    measure_turns(switcher, plans, torch.randint(3, vocab, (1, 64), device=device), 2)
    rows = []
    for context in settings.contexts:
        for batch in settings.batches:
            ids = torch.randint(3, vocab, (batch, context), generator=generator).to(device)
            started = time.perf_counter()
            measured = measure_turns(switcher, plans, ids, settings.decode_tokens)
            for label, plan in plans.items():
                m = measured[label]
                per_sequence = m["kv_bytes"] // batch
                rows.append({
                    "plan_label": label, "plan": str(plan), "context": context, "batch": batch,
                    "decode_tokens": settings.decode_tokens, "prefill_s": m["prefill_s"],
                    "prefill_tok_s": batch * context / m["prefill_s"], "decode_step_s": m["decode_step_s"],
                    "decode_tok_s": batch / m["decode_step_s"], "kv_bytes": m["kv_bytes"],
                    "kv_bytes_per_seq": per_sequence, "weight_bytes": weights,
                    "peak_bytes": m.get("peak_bytes", weights + m["kv_bytes"]),
                    "peak_source": "cuda max_memory_allocated" if "peak_bytes" in m else "weights + kv (cpu estimate)",
                })
            if progress:
                log.info("bench ctx %d batch %d: %.1f s for %d plans", context, batch, time.perf_counter() - started,
                         len(plans))
    switcher.restore()
    _add_max_batch(rows, budget, weights)
    return rows


def _add_max_batch(rows: list[dict], budget: int, weights: int) -> None:
    """Max batch under the budget and the decode throughput there, per (plan, context)."""
    step_times: dict[tuple, dict[int, float]] = {}
    for r in rows:
        step_times.setdefault((r["plan_label"], r["context"]), {})[r["batch"]] = r["decode_step_s"]
    for r in rows:
        measured = step_times[(r["plan_label"], r["context"])]
        r["memory_budget_bytes"] = budget
        if r["kv_bytes_per_seq"] == 0:  # keeps no cache: memory never limits the batch
            r.update(max_batch=None, max_batch_tok_s=None, throughput_source="no KV: batch not memory-bound")
            continue
        max_batch = max(budget - weights, 0) // r["kv_bytes_per_seq"]
        r["max_batch"] = max_batch
        if max_batch == 0:
            r.update(max_batch_tok_s=0.0, throughput_source="weights alone exceed the budget")
        elif max_batch in measured:
            r.update(max_batch_tok_s=max_batch / measured[max_batch], throughput_source="measured")
        else:
            r.update(max_batch_tok_s=max_batch / step_time_at(max_batch, measured),
                     throughput_source=f"estimated: line through step times at batches {sorted(measured)}")


def ratio_rows(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """Per non-baseline row: its decode speed, KV bytes, prefill time and max-batch throughput over the baseline's."""
    base = {(r["context"], r["batch"]): r for r in rows if r["plan_label"] == baseline}
    out = []
    for r in rows:
        b = base.get((r["context"], r["batch"]))
        if r["plan_label"] == baseline or b is None:
            continue

        def ratio(key):
            return r[key] / b[key] if r[key] is not None and b[key] else float("nan")

        out.append({"plan_label": r["plan_label"], "context": r["context"], "batch": r["batch"],
                    "decode_speedup": ratio("decode_tok_s"), "kv_ratio": ratio("kv_bytes"),
                    "prefill_speedup": b["prefill_s"] / r["prefill_s"], "max_batch_ratio": ratio("max_batch"),
                    "max_batch_throughput_ratio": ratio("max_batch_tok_s")})
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """The measurements as a fixed-width text table, plus the ratios to all-softmax."""
    columns = [("plan_label", "plan"), ("context", "ctx"), ("batch", "batch"), ("prefill_s", "prefill s"),
               ("decode_tok_s", "decode tok/s"), ("kv_bytes", "KV MiB"), ("peak_bytes", "peak MiB"),
               ("max_batch", "max batch"), ("max_batch_tok_s", "tok/s @max")]
    def cell(r, key):
        value = r[key]
        return _fmt(value / 2**20) if key in ("kv_bytes", "peak_bytes") else _fmt(value)

    table = [[title for _, title in columns]] + [[cell(r, key) for key, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(text.rjust(w) for text, w in zip(line, widths)) for line in table]
    ratios = ratio_rows(rows)
    if ratios:
        lines.append("")
        lines.append("ratios to all-softmax (same context and batch):")
        for q in ratios:
            lines.append(f"  {q['plan_label']:>12} ctx {q['context']:>6} batch {q['batch']:>4}: decode "
                         f"{_fmt(q['decode_speedup'])}x, KV {_fmt(q['kv_ratio'])}x, prefill {_fmt(q['prefill_speedup'])}x, "
                         f"max batch {_fmt(q['max_batch_ratio'])}x, throughput @max batch "
                         f"{_fmt(q['max_batch_throughput_ratio'])}x")
    sources = sorted({r["throughput_source"] for r in rows} | {r["peak_source"] for r in rows})
    lines.append("sources: " + "; ".join(sources))
    return "\n".join(lines)


def write_html(rows: list[dict], path: Path, title: str) -> None:
    """Four panels (prefill time, decode speed, KV per sequence, throughput at max batch), one bar per plan."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [("prefill_s", "prefill (s)"), ("decode_tok_s", "decode tokens/s"),
              ("kv_bytes_per_seq", "KV bytes per sequence"), ("max_batch_tok_s", "tokens/s at max batch")]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels])
    labels = list(dict.fromkeys(r["plan_label"] for r in rows))
    for index, (key, _) in enumerate(panels):
        for color, label in enumerate(labels):
            mine = [r for r in rows if r["plan_label"] == label]
            fig.add_trace(go.Bar(name=label, x=[f"ctx {r['context']} b {r['batch']}" for r in mine],
                                 y=[r[key] for r in mine], legendgroup=label, showlegend=index == 0,
                                 marker_color=["#636efa", "#ef553b", "#00cc96", "#ab63fa"][color % 4]),
                          row=index // 2 + 1, col=index % 2 + 1)
    fig.update_layout(title=title, barmode="group", template="plotly_white", height=800)
    with atomic_path(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True)

