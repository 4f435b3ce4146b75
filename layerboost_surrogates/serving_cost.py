"""The serving cost model: what any plan costs at a workload, composed from pieces measured once per device.

Layers of one model have the same shapes, so at a fixed batch a plan's time is additive in its layers' options.
The pieces, per option, are its uniform plan's time minus the all-`none` plan's, over the number of layers:

    prefill[o]      one prompt of `prefill` tokens, batch 1                     -> time to first token
    step[o][B]      one decode step of B sequences at a request's mean context, -> time per output token at B
                    for B on a grid spanning every concurrency a plan can get     (linear between grid points)

and the exact cache bytes of each option per layer (cost_model.kv_bytes_per_layer), not measured. A plan's
concurrency follows from those bytes (`Workload.concurrency`: the memory budget, capped by `workload.batch`);
then, as the serving measurement defines them (layerboost_core.serving.Served): TTFT, TPOT at that concurrency,
throughput = B * decode / (B * TTFT + decode * TPOT) and request latency = B * TTFT + decode * TPOT.

Throughput under a memory budget is not additive (the concurrency depends on the whole plan's cache), so the
exact front solver gets additive *views*: at each grid concurrency B, the cost of one output token at B
(TTFT / decode + TPOT(B) / B), valid for the plans whose cache lets B sequences fit (a KV budget the solver
takes as a constraint). Every option's uniform plan is timed in turns with the others for `repeats` rounds, each
piece as the serving measurement times it (a prefill: the fastest round; a decode step: the median round);
measured once per device, model, option settings and workload, cached with every round's values, which
`dominated` reads: an option is dropped only when its costs lie above softmax's in every round of every piece
(two measurements that disagree decide nothing). The measurement's own cost is stated in `pieces_work`: on a
2-core CPU at the default workload ~100 s (3 rounds x 4 options x 3 prefills, a mean-context prefill and 9
decode steps at each of 3 concurrencies), once per device and workload.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch
from filelock import FileLock

from layerboost_core.cache_dir import cache_root, content_hash, write_json
from layerboost_core.plan import LayerPlan
from layerboost_core.serving import (DECODE_STEPS, PREFILLS, Served, batch_at_context, decode_steps, mean_context,
                                     prompt_ids, time_to_first_token)
from layerboost_core.timing import model_device, time_rounds
from layerboost_core.workload import Workload

from .cost_model import AdditiveCostModel, device_name, kv_bytes_per_layer

log = logging.getLogger(__name__)

COST_FORMAT = "serving-cost/v5"  # v5: the `linear` inference prefill kernel (timings before it are stale)
SPEEDS = ("throughput", "ttft", "tpot", "latency")  # what `latency(plan)` returns the cost of (lower is better)


def concurrency_grid(low: int, high: int) -> list[int]:
    """Concurrencies the decode step is timed at: `low`, x4 up to `high`, and `high` (sorted, distinct). Step time
    is close to linear in the batch over such spans (between them the model interpolates)."""
    grid, b = [], max(1, low)
    while b < high:
        grid.append(b)
        b *= 4
    return sorted({*grid, max(1, high)})


def interpolate(grid: list[int], values: list[float], b: float) -> float:
    """Piecewise-linear value at `b` through (grid, values); linear extrapolation beyond the ends."""
    if len(grid) == 1:
        return values[0] * b / grid[0]  # one point: proportional (a step of b sequences, b/grid[0] as much work)
    k = min(max(1, next((i for i, g in enumerate(grid) if g >= b), len(grid) - 1)), len(grid) - 1)
    x0, x1, y0, y1 = grid[k - 1], grid[k], values[k - 1], values[k]
    return y0 + (y1 - y0) * (b - x0) / (x1 - x0)


@dataclass
class ServingCostModel:
    """Predicted serving of any plan at one workload (see the module docstring). `speed` names the metric whose
    cost `latency(plan)` returns: seconds per output token (throughput), TTFT, TPOT or request latency."""

    workload: dict
    grid: list[int]  # concurrencies the decode step was timed at (empty without decode steps)
    base_prefill_s: float  # all-`none`
    prefill_s: dict[str, float]  # option -> seconds per layer above `none`
    base_step_s: list[float]  # per grid point
    step_s: dict[str, list[float]]  # option -> per grid point, seconds per layer above `none`
    kv_layer_bytes: dict[str, list[int]]  # option -> per layer, cache bytes of one sequence at prefill + decode
    weight_bytes: int
    rounds: dict  # option -> {"prefill": [per round], "step": [[per grid point] per round]}: uniform plans
    device: str
    settings: dict
    speed: str = "latency"
    measured_work: dict | None = None  # forwards and tokens spent measuring it now (None: read from the cache)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return int(self.settings["num_layers"])

    @property
    def load(self) -> Workload:
        return Workload(**self.workload)

    def with_speed(self, speed: str) -> "ServingCostModel":
        """The same pieces, pricing plans by `speed` (one of SPEEDS)."""
        if speed not in SPEEDS:
            raise ValueError(f"speed {speed!r}; allowed: {', '.join(SPEEDS)}")
        return ServingCostModel(**{**{k: getattr(self, k) for k in self.__dataclass_fields__ if k != "_memo"},
                                   "speed": speed})

    def kv_bytes(self, plan: LayerPlan) -> int:
        """Cache bytes of one sequence holding prefill + decode tokens under `plan` (exact)."""
        return sum(self.kv_layer_bytes[o][i] for i, o in enumerate(plan.layers))

    def concurrency(self, plan: LayerPlan) -> int:
        return self.load.concurrency(self.kv_bytes(plan), self.weight_bytes, self.original_kv_bytes)

    @property
    def original_kv_bytes(self) -> int:
        """One all-softmax sequence's cache at the workload's context (what `memory_sequences` counts in)."""
        return sum(self.kv_layer_bytes["softmax"])

    def ttft(self, plan: LayerPlan) -> float:
        return self.base_prefill_s + sum(self.prefill_s[o] for o in plan.layers)

    def tpot(self, plan: LayerPlan, batch: int | None = None) -> float | None:
        """Seconds of one decode step at `batch` sequences (default: the plan's concurrency); None without decode."""
        if not self.grid:
            return None
        b = self.concurrency(plan) if batch is None else batch
        per_point = [self.base_step_s[k] + sum(self.step_s[o][k] for o in plan.layers) for k in range(len(self.grid))]
        return interpolate(self.grid, per_point, b)

    def predict(self, plan: LayerPlan) -> Served:
        """TTFT, TPOT, concurrency (and from them throughput and request latency) of `plan` at the workload."""
        key = str(plan)
        if key not in self._memo:
            b = self.concurrency(plan)
            self._memo[key] = Served(self.ttft(plan), self.tpot(plan, b) if b else None, b, self.load.decode)
        return self._memo[key]

    def latency(self, plan: LayerPlan) -> float:
        """The cost of `plan` in the `speed` metric, lower is better (throughput: seconds per output token)."""
        return speed_cost(self.predict(plan), self.speed)

    def fastest(self, options) -> float:
        """The lowest cost among the uniform plans of `options` (a lower bound the ceiling checks use)."""
        return min(self.latency(LayerPlan.uniform(o, self.num_layers)) for o in options)

    # --- additive views for the exact front solver --------------------------------------------------------

    def views(self, limit: int = 3) -> list[tuple[AdditiveCostModel, float | None]]:
        """[(additive cost model, KV budget per sequence or None)]: at up to `limit` grid concurrencies (both ends
        and between), the `speed` cost of a plan whose cache lets that many sequences fit, per layer."""
        load = self.load
        points = list(range(len(self.grid))) if self.grid else [None]
        if len(points) > limit:  # both ends first (one view: the fewest sequences, the original's concurrency)
            points = sorted({points[round(i * (len(points) - 1) / max(1, limit - 1))] for i in range(limit)})
        views = []
        for k in points:
            b = load.batch if k is None else self.grid[k]
            budget = None
            memory = load.budget_bytes(self.weight_bytes, self.original_kv_bytes)
            if memory is not None and k is not None:
                budget = (memory - self.weight_bytes) / b
            base = self._view_cost(self.base_prefill_s, None if k is None else self.base_step_s[k], b)
            per_layer = {o: self._view_cost(self.prefill_s[o], None if k is None else self.step_s[o][k], b)
                         for o in self.prefill_s}
            views.append((AdditiveCostModel(base, per_layer, {}, {**self.workload, "concurrency": b}, self.device,
                                            self.settings), budget))
        return views

    def _view_cost(self, prefill: float, step: float | None, b: int) -> float:
        """One layer's (or the base's) share of the `speed` cost at concurrency `b` (additive at fixed b)."""
        d = self.load.decode
        if self.speed == "ttft" or not d or step is None:
            return prefill if self.speed != "latency" else b * prefill
        return {"throughput": prefill / d + step / b, "tpot": step, "latency": b * prefill + d * step}[self.speed]

    @property
    def per_layer_seconds(self) -> dict[str, float]:
        """The first view's per-layer costs (what local moves of the gap filler rank options by)."""
        return self.views(1)[0][0].per_layer_seconds

    def dominated(self, option: str, kv_matters: bool) -> bool:
        """True when `option` costs no less than softmax in every piece, in every round (and keeps no smaller
        a cache, when cache bytes matter: a memory budget, or memory an objective)."""
        if option == "softmax" or "softmax" not in self.rounds or option not in self.rounds:
            return False
        if kv_matters and sum(self.kv_layer_bytes[option]) < sum(self.kv_layer_bytes["softmax"]):
            return False
        mine, soft = self.rounds[option], self.rounds["softmax"]
        pieces = [(mine["prefill"], soft["prefill"])]
        if self.grid and self.load.decode and self.speed != "ttft":
            pieces += [([r[k] for r in mine["step"]], [r[k] for r in soft["step"]]) for k in range(len(self.grid))]
        if self.speed == "tpot":
            pieces = pieces[1:]
        return all(min(a) >= max(b) for a, b in pieces)


def speed_cost(served: Served, speed: str) -> float:
    """Lower-is-better cost of a serving measurement or prediction: seconds per output token for throughput."""
    if speed == "throughput":
        return 1.0 / served.throughput if served.throughput > 0 else math.inf
    value = served.metric(speed)
    return math.inf if value is None else value


def measure_pieces(switcher, workload: Workload, options, grid: list[int], seed: int = 0) -> dict:
    """{option: {"prefill": [s per round], "step": [[s per grid point] per round]}} of each option's uniform plan,
    options taking turns for `workload.repeats` rounds, each piece timed as the serving measurement times it
    (layerboost_core.serving: the fastest of its prefills, the median of its decode steps)."""
    model = switcher.model
    device = model_device(model)
    vocab = model.config.vocab_size
    prompt = prompt_ids(vocab, workload.prefill, seed, device)
    context = prompt_ids(vocab, mean_context(workload), seed + 1, device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    out = {o: {"prefill": [], "step": []} for o in options}

    def pieces():
        prefill = time_to_first_token(model, prompt, sync)  # as the serving measurement times it
        steps = []
        if workload.decode:
            single, token = batch_at_context(model, context, 1)
            for b in grid:
                cache = copy.deepcopy(single)  # decoding writes into the cache: every batch starts from the same one
                if b > 1:
                    cache.batch_repeat_interleave(b)
                times = decode_steps(model, cache, token.repeat_interleave(b, dim=0), DECODE_STEPS + 1, sync)
                steps.append(statistics.median(times[1:]))  # the first step pays for the batch's new buffers
                del cache
        return prefill, steps

    plans = {o: LayerPlan.uniform(o, switcher.num_layers) for o in options}

    def keep(option, result):
        out[option]["prefill"].append(result[0])
        out[option]["step"].append(result[1])

    try:
        with torch.inference_mode():
            time_rounds({o: pieces for o in options}, rounds=workload.repeats, warmup=0,
                        before=lambda o: switcher.apply(plans[o]), after=keep, alternate=True)
    finally:
        switcher.restore()
    return out


def serving_cost_model(switcher, model_info: dict, option_settings: dict, workload: Workload, options,
                       speed: str = "latency") -> ServingCostModel:
    """The cached serving cost model for this device, model, option settings and workload (measured on first use,
    drivers started together waiting for one measurement)."""
    from layerboost_core.bench import weight_bytes

    model = switcher.model
    config, n = model.config, switcher.num_layers
    options = tuple(sorted(set(options) | {"softmax", "none"}))
    weights = weight_bytes(model)
    context = workload.prefill + workload.decode
    kv = {o: kv_bytes_per_layer(o, config, option_settings, context, model.dtype.itemsize, n) for o in options}
    grid = []
    if workload.decode:
        original = sum(kv["softmax"])
        low = workload.concurrency(original, weights, original)  # the largest cache serves the fewest at once
        if low < 1:
            from layerboost_core.errors import UserError

            raise UserError(f"workload.memory_gib: {workload.memory_gib} GiB does not hold the weights "
                            f"({weights / 2**30:.2f} GiB) and one all-softmax sequence of {context} tokens "
                            f"({original / 2**20:.0f} MiB)")
        grid = concurrency_grid(low, workload.batch) if workload.memory_bound else [workload.batch]
    settings = {"model": model_info["fingerprint"], "num_layers": n, "options": option_settings,
                "dtype": str(model.dtype)}
    dev = device_name(model_device(model))
    key = content_hash(COST_FORMAT, dev, settings, asdict(workload), options, grid)
    path = cache_root() / "costs" / f"{model_info['name'].replace('/', '--')}-serving-{key}.json"
    with FileLock(f"{path}.lock"):  # two timings at once would skew each other
        rounds = None
        if path.exists():
            try:
                rounds = json.loads(path.read_text())["rounds"]
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("cost model cache %s is unreadable; measuring again", path)
        work = None
        if rounds is None:
            log.info("measuring %s at %s on %s: prefill, and decode steps at %s sequences", ", ".join(options),
                     asdict(workload), dev, grid or "no")
            _check_memory(kv["softmax"], grid, workload)
            rounds = measure_pieces(switcher, workload, options, grid)
            work = pieces_work(workload, len(options), grid)
            write_json(path, {"format": COST_FORMAT, "device": dev, "settings": settings,
                              "workload": asdict(workload), "grid": grid, "rounds": rounds})
    # The prefill: the fastest round (each already the fastest of its prefills: interference only adds time, and
    # a round's first prefill after another plan ran can pay for allocations); a decode step: the median round.
    median = {o: {"prefill": min(r["prefill"]),
                  "step": [statistics.median(per[k] for per in r["step"]) for k in range(len(grid))]}
              for o, r in rounds.items()}
    base = median["none"]
    return ServingCostModel(
        workload=asdict(workload), grid=grid, base_prefill_s=base["prefill"],
        prefill_s={o: (m["prefill"] - base["prefill"]) / n for o, m in median.items()},
        base_step_s=base["step"], step_s={o: [(s - b) / n for s, b in zip(m["step"], base["step"])]
                                          for o, m in median.items()},
        kv_layer_bytes=kv, weight_bytes=weights, rounds=rounds, device=dev, settings=settings, speed=speed,
        measured_work=work)


def pieces_work(workload: Workload, options: int, grid: list[int]) -> dict:
    """Forwards and tokens `measure_pieces` runs: per option and round (a warm-up round included), the prompt's
    prefill, and with decode steps the mean-context prefill and DECODE_STEPS + 1 steps at each grid concurrency."""
    rounds = workload.repeats
    forwards = PREFILLS + (1 + (DECODE_STEPS + 1) * len(grid) if workload.decode else 0)
    tokens = PREFILLS * workload.prefill + (mean_context(workload) + (DECODE_STEPS + 1) * sum(grid)
                                            if workload.decode else 0)
    return {"forwards": rounds * options * forwards, "tokens": rounds * options * tokens}


def _check_memory(softmax_kv: list[int], grid: list[int], workload: Workload) -> None:
    """Refuse a grid whose all-softmax batch would not fit this machine's free memory (timing it would swap)."""
    if not grid:
        return
    import psutil

    needed = max(grid) * sum(softmax_kv) * 2  # the batch's cache plus the copy it is repeated from, roughly
    free = psutil.virtual_memory().available
    if needed > 0.8 * free:
        from layerboost_core.errors import UserError

        raise UserError(f"workload.batch: {workload.batch} all-softmax sequences of {workload.prefill + workload.decode} "
                        f"tokens need ~{needed / 2**30:.1f} GiB to be timed here, {free / 2**30:.1f} GiB is free; "
                        "lower workload.batch")
