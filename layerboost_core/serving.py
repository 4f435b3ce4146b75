"""How a plan serves a workload's requests, measured: time to first token, time per output token, throughput.

A request is a prompt of `prefill` tokens and `decode` output tokens; a server holds `concurrency` of them at once
(workload.py decides how many fit). Measured for the plan in place, with the hybrid cache (cache.py):

  ttft   one prompt prefilled into a fresh cache, its first token chosen: a server admits requests one at a
         time, so this is every request's prefill cost (queueing not included). The fastest of `PREFILLS`
         prefills: on a shared machine interference only ever adds time, and the first call after another plan
         ran pays for its allocations (measured: 3 prefills keep per-round ratios within ~3%, 1 within ~15%).
  tpot   one greedy decode step of `concurrency` sequences, each holding the mean context of a request
         (prefill + decode / 2 tokens: the step's cost is linear in the context, so the step at the mean context
         is the mean step): the median of `steps` steps after one untimed step. The batch is one prefilled
         sequence repeated `concurrency` times: equal-length requests, prefilled once instead of `concurrency`.

What follows from them, at steady state (a finished request replaced by a new one):

  throughput       output tokens/s = concurrency * decode / (concurrency * ttft + decode * tpot): each request
                   costs its prefill and its share of `decode` steps of the batch
  request latency  concurrency * decode / throughput = concurrency * ttft + decode * tpot (Little's law: what
                   a request waits from arrival to its last token while `concurrency` are in flight)

With `decode = 0` (prefill-only workloads) there is no step: latency is `concurrency` prefills and throughput
is not defined (0). `serve_in_turns` measures plans taking turns (timing.time_rounds), so a drift of the machine
hits them alike; `benchmarks/bench_serving.py` checks these figures against serving whole requests.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from .cache import HybridCache, stack_caches
from .timing import model_device, time_rounds
from .workload import Workload


@dataclass(frozen=True)
class Served:
    """One measurement of a plan serving a workload (seconds; concurrency in sequences)."""

    ttft_s: float
    tpot_s: float | None  # None: no decode step (decode = 0)
    concurrency: int
    decode: int

    @property
    def throughput(self) -> float:
        """Output tokens per second at steady state (0 without output tokens)."""
        if not self.decode or not self.concurrency or self.tpot_s is None:
            return 0.0
        return self.concurrency * self.decode / (self.concurrency * self.ttft_s + self.decode * self.tpot_s)

    @property
    def latency_s(self) -> float:
        """Request latency at steady state (Little's law): concurrency x ttft + decode x tpot."""
        if not self.concurrency or (self.decode and self.tpot_s is None):
            return float("inf")  # cannot serve: not one sequence's cache fits
        return self.concurrency * self.ttft_s + (self.decode * self.tpot_s if self.decode else 0.0)

    def metric(self, name: str) -> float:
        """`ttft`, `tpot`, `throughput` or `latency` by name."""
        return {"ttft": self.ttft_s, "tpot": self.tpot_s, "throughput": self.throughput,
                "latency": self.latency_s}[name]


PREFILLS = 3  # prefills per TTFT measurement (the fastest counts)
DECODE_STEPS = 8  # decode steps timed per TPOT measurement, after one untimed (their median counts): the serving
# measurement and the cost model's pieces time a step alike


def prompt_ids(vocab: int, length: int, seed: int, device) -> torch.Tensor:
    """(1, length) random token ids (ids 0-2 left out: special tokens); the same for every plan of a run."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator).to(device)


def first_token(model, ids: torch.Tensor) -> tuple[HybridCache, torch.Tensor]:
    """`ids` (B, S) prefilled into a fresh HybridCache for the plan in place; (cache, next tokens (B, 1))."""
    cache = HybridCache(model)
    logits = model(ids, cache=cache, logits_to_keep=1).logits  # no full-vocabulary logits per prompt token
    return cache, logits[:, -1].argmax(-1, keepdim=True)


def decode_steps(model, cache: HybridCache, token: torch.Tensor, steps: int, sync=lambda: None) -> list[float]:
    """Seconds of each of `steps` greedy decode steps from `token` (B, 1) through `cache`."""
    times = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        token = model(token, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        sync()
        times.append(time.perf_counter() - started)
    return times


def time_to_first_token(model, ids: torch.Tensor, sync=lambda: None, prefills: int = PREFILLS) -> float:
    """Seconds of the fastest of `prefills` prefills of `ids` (1, S) into a fresh cache, first token chosen."""
    times = []
    for _ in range(prefills):
        sync()
        started = time.perf_counter()
        first_token(model, ids)
        sync()
        times.append(time.perf_counter() - started)
    return min(times)


def time_per_output_token(model, ids: torch.Tensor, concurrency: int, steps: int, sync=lambda: None) -> float:
    """The median seconds of `steps` decode steps of `concurrency` sequences holding `ids` (1, S) each (one
    untimed step first: it pays for the batch's new buffers)."""
    cache, token = batch_at_context(model, ids, concurrency)
    return statistics.median(decode_steps(model, cache, token, steps + 1, sync)[1:])


def batch_at_context(model, ids: torch.Tensor, concurrency: int) -> tuple[HybridCache, torch.Tensor]:
    """A cache of `concurrency` sequences holding `ids` (1, S) each, and their next tokens: one prefill, repeated."""
    cache, token = first_token(model, ids)
    if concurrency > 1:
        cache.batch_repeat_interleave(concurrency)
        token = token.repeat_interleave(concurrency, dim=0)
    return cache, token


def mean_context(workload: Workload) -> int:
    """Tokens a sequence holds at the mean decode step of a request (the step's cost is linear in it)."""
    return workload.prefill + workload.decode // 2


def serve_in_turns(switcher, plans: dict, workload: Workload, concurrency: dict[str, int], rounds: int,
                   steps: int = DECODE_STEPS, seed: int = 0, prefills: int = PREFILLS) -> dict[str, list[Served]]:
    """Per label of `plans` ({label: LayerPlan}), one `Served` per round at `concurrency[label]` sequences, plans
    taking turns (in reverse order every other round). No warm-up round: the first of each measurement's
    `prefills` prefills and its untimed decode step pay for what a first call costs. `steps` decode steps are
    timed."""
    model = switcher.model
    device = model_device(model)
    vocab = model.config.vocab_size
    prompt = prompt_ids(vocab, workload.prefill, seed, device)
    context = prompt_ids(vocab, mean_context(workload), seed + 1, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    served: dict[str, list[Served]] = {label: [] for label in plans}

    def request(label):
        def call():
            ttft = time_to_first_token(model, prompt, sync, prefills)
            tpot = time_per_output_token(model, context, concurrency[label], steps, sync) if workload.decode else None
            return Served(ttft, tpot, concurrency[label], workload.decode)
        return call

    try:
        with torch.inference_mode():
            time_rounds({label: request(label) for label in plans}, rounds=rounds, warmup=0,
                        before=lambda label: switcher.apply(plans[label]),
                        after=lambda label, result: served[label].append(result), alternate=True)
    finally:
        switcher.restore()
    return served


def serve_requests(model, workload: Workload, concurrency: int, seed: int = 0) -> dict:
    """Whole requests, for checking `serve_in_turns` and the cost model: `concurrency` prompts prefilled one at
    a time (each timed), then every one of `decode` steps of the batch timed; the plan in place. Returns the
    seconds of each prefill and each step, and the throughput and mean step they give."""
    device = model_device(model)
    vocab = model.config.vocab_size
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        prompts = [prompt_ids(vocab, workload.prefill, seed + k, device) for k in range(concurrency)]
        prefills, caches, tokens = [], [], []
        for ids in prompts:
            sync()
            started = time.perf_counter()
            cache, token = first_token(model, ids)
            sync()
            prefills.append(time.perf_counter() - started)
            caches.append(cache)
            tokens.append(token)
        cache = caches[0]
        if concurrency > 1:  # one batch of every prompt's cache: the same shapes a batched server holds
            cache = stack_caches(caches)
        del caches
        steps = decode_steps(model, cache, torch.cat(tokens), workload.decode, sync) if workload.decode else []
    total = sum(prefills) + sum(steps)
    return {"prefill_s": prefills, "step_s": steps,
            "throughput": concurrency * workload.decode / total if workload.decode else 0.0,
            "tpot_s": statistics.mean(steps) if steps else None, "ttft_s": statistics.median(prefills)}
