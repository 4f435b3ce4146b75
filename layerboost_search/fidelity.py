"""The fidelity ladder: front candidates re-measured on held-out text the search never scored.

The proxy sees one block at the workload's context; a plan picked on it has thin evidence. A rung re-measures
the same metrics against the original model on its own blocks (`RungSettings`: `blocks` blocks of `factor` x
the workload's prefill tokens, each with `facts` facts planted and queried at its end, facts.py), cut from the
held-out text of its source AFTER everything the proxy and the earlier rungs scored (`data.heldout_sections`),
so no rung re-reads text the search saw. Each block and each fact is kept, so the report gives a bootstrap
interval over blocks and a binomial interval over facts, and picks on their pessimistic ends (picks.py).
Results live in the study's user attrs (Optuna refuses to change finished trials), so a resumed run measures
only what is missing. The report draws one front per fidelity and never mixes them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import statistics

from layerboost_core.pareto import non_dominated

from .study import PLAN_ATTR

log = logging.getLogger(__name__)

# + "<rung>:trial:<n>" -> {"metrics", "per_block", "per_fact", "original", "settings"} (see record_rung)
RUNG_STUDY_ATTR = "fidelity:"
SEPARATOR = "|"  # the runner passes one string: "<rung name>|<plan>"
LEVEL = 0.9  # every interval the report gives


# --- measuring (inside an evaluator) ----------------------------------------------------------------------------


def rung_blocks(tokenizer, rungs, name: str, data, prefill: int, fact_seed: int = 0):
    """The `PlantedBlocks` of rung `name` (one of `rungs`, lowest first): its `blocks` blocks of `factor` x
    `prefill` tokens with `facts` facts planted in each, from the held-out split of its source (the search's
    `data.source` when it names none), taken after the proxy's own blocks when the source is the search's and
    after the blocks of every earlier rung of the same source."""
    from layerboost_core.data import heldout_sections
    from layerboost_core.errors import UserError
    from layerboost_core.facts import plant_facts

    rung = next(r for r in rungs if r.name == name)
    source = rung.source or data.source
    sections = []
    if source == data.source:
        if data.blocks.get("heldout") is None:
            raise UserError(f"fidelity.rungs: rung {name!r} needs held-out text the proxy did not score, but the proxy "
                            "scores all of it (data.blocks.heldout: null); set data.blocks.heldout or the rung's source")
        sections.append((int(data.blocks["heldout"]), int(data.heldout_seq_len)))
    for earlier in rungs[: rungs.index(rung) + 1]:
        if (earlier.source or data.source) == source:
            sections.append((earlier.blocks, earlier.seq_len(prefill)))
    blocks = heldout_sections(tokenizer, source, sections, data.fractions, data.text_field, data.mix_sources)[-1]
    if blocks.shape[0] < rung.blocks:
        raise UserError(f"fidelity.rungs: rung {name!r} asks for {rung.blocks} block(s) of {rung.seq_len(prefill)} "
                        f"tokens; the held-out text of {source!r} left after the proxy and the earlier rungs gives "
                        f"{blocks.shape[0]}")
    # planted with the rung's own seed (not the proxy's facts again); a rung answered by generation asks every block
    # about the same keys, so its blocks are answered as one batch
    return plant_facts(tokenizer, blocks, rung.facts_per_block(prefill), seed=f"{fact_seed}:{name}",
                       shared_keys=rung.generate)


def split_job(text: str) -> tuple[str, str]:
    """("<rung name>", "<plan>") of an `evaluate_at` job string."""
    name, _, plan = text.partition(SEPARATOR)
    return name, plan


# --- the ladder (in the driver) ---------------------------------------------------------------------------------


def spread(front: list, k: int) -> list:
    """`k` trials spread over the latency-sorted `front`: its ends and evenly between (all when k >= len)."""
    if len(front) <= k:
        return list(front)
    if k <= 1:
        return front[:k]
    step = (len(front) - 1) / (k - 1)
    return [front[round(i * step)] for i in range(k)]


def proxy_metrics(trial) -> dict:
    """The proxy's metrics a trial recorded ({name: value}, from its `proxy:<name>` user attrs)."""
    return {k.removeprefix("proxy:"): v for k, v in trial.user_attrs.items() if k.startswith("proxy:")}


def retrieval_loss(trial) -> float:
    """The proxy's retrieval NLL of a trial (nats per answer token of its planted facts; continuous where 16 facts'
    accuracy is mostly all or all but one), 0 where no facts were planted: then every plan ties."""
    return proxy_metrics(trial).get("retrieval_nll", 0.0)


def is_original(plan: str) -> bool:
    """True for the all-softmax plan: the original model itself (measured as the reference, never offered)."""
    return set(plan) == {"S"}


def ladder_candidates(front: list, k: int, bars, shares, reference_cost: float | None, cost_of, floor: float = 0.0) -> list:
    """Up to `k` trials of the fastest-first proxy `front` worth re-measuring: the plans the best-plan files can
    name. In order: all-softmax (the reference every "kept" share and retrieval is read against), for each
    quality bar the fastest plan keeping it at the proxy (see `retained`), for each speed target (`shares` of
    all-softmax's cost `reference_cost`; `cost_of(trial)` is a trial's) the plan losing least within it,
    then plans spread over the front. Spreading alone spent most re-measurements on plans far past any bar a
    user accepts; plans keeping less than `floor` at the proxy (the quality floor of every best file) are not
    candidates. Within a speed target the plan losing least retrieval comes first (`retrieval_loss`), top-1
    agreement breaking ties: retrieval is the floor fast plans fail at the confirmation rung (a default run's
    2x target took its most agreeing plan, 0.91 agreement and 0.19 proxy retrieval NLL against 0.05 for the
    plans that kept the floor, and it found 107 of 128 facts where about 117 were needed)."""
    picks: list = []

    def add(trial) -> None:
        if trial is not None and trial not in picks and len(picks) < k:
            picks.append(trial)

    kept = {t.number: retained(proxy_metrics(t)) or 0.0 for t in front}
    front = [t for t in front if kept[t.number] >= floor or is_original(t.user_attrs.get(PLAN_ATTR, ""))]
    add(next((t for t in front if is_original(t.user_attrs.get(PLAN_ATTR, ""))), None))
    for bar in bars:
        add(next((t for t in front if kept[t.number] >= bar), None))  # front is sorted fastest first
    if reference_cost:
        for share in shares:
            under = [t for t in front if cost_of(t) <= share * reference_cost]
            add(min(under, key=lambda t: (retrieval_loss(t), -kept[t.number])) if under else None)
    for trial in [*spread(front, k), *front]:
        add(trial)
    return picks


def screened_pool(trials: list, k: int, keeps, quality_sign: int, cost_of) -> list:
    """The trials confirmation draws its candidates from, fastest first: of the feasible `trials`, those
    `keeps(trial)` says keep every floor and ceiling on their point estimates at the proxy, in successive Pareto
    layers of (quality, cost) until more than `k` are had. The search's own constraints drop a plan only when its
    few proxy facts show it below the retrieval floor (objectives.retrieval_shortfall), so its front fills with
    plans that lose a fact in ten: all four candidates of a default run then missed the floor at the 128 facts of
    the confirmation rung. Drawing from plans that keep the floor on their point estimate, beyond the first layer
    where the front has too few, spends confirmation on plans that can be offered. `quality_sign`: +1 when
    the first objective is minimised, -1 when maximised."""
    left = [t for t in trials if keeps(t)]
    pool: list = []
    while left and len(pool) <= k:
        layer = set(non_dominated([(quality_sign * t.values[0], cost_of(t)) for t in left]))
        pool += [t for i, t in enumerate(left) if i in layer]
        left = [t for i, t in enumerate(left) if i not in layer]
    return sorted(pool, key=cost_of)


def faster_than_keepers(pool: list, k: int, bar: float, cost_of) -> list:
    """Up to `k` trials of `pool` costing less than `bar` (the fastest confirmed plan that kept the floors), least
    proxy retrieval loss first (`retrieval_loss`), the faster of a tie first: the plans past the fastest keeper
    most likely to keep retrieval too."""
    faster = [t for t in pool if cost_of(t) < bar]
    return sorted(faster, key=lambda t: (retrieval_loss(t), cost_of(t)))[:k]


def record_rung(study, rung, number: int, result: dict) -> None:
    """Keep `result` of trial `number` at `rung`: its means, per-block and per-fact values, the original's
    retrieval on the same facts, and the rung's settings (a rung re-declared under the same name with other
    settings is measured again, not mixed with the old numbers)."""
    def floats(mapping):
        return {k: [float(x) for x in v] for k, v in (mapping or {}).items()}

    study.set_user_attr(f"{RUNG_STUDY_ATTR}{rung.name}:trial:{number}",
                        {"metrics": {k: float(v) for k, v in result["metrics"].items()},
                         "per_block": floats(result["per_block"]), "per_fact": floats(result.get("per_fact")),
                         "original": floats(result.get("original")), "settings": dataclasses.asdict(rung)})


def rung_scores(study) -> dict[str, dict[int, dict]]:
    """{rung: {trial number: {"metrics": ..., "per_block": ...}}} of every re-measured trial."""
    scores: dict[str, dict[int, dict]] = {}
    for key, value in study.user_attrs.items():
        if key.startswith(RUNG_STUDY_ATTR) and ":trial:" in key:
            rung, _, number = key.removeprefix(RUNG_STUDY_ATTR).rpartition(":trial:")
            scores.setdefault(rung, {})[int(number)] = value
    return scores


def climb(study, runner, candidates: list, rungs, plan_of, progress: bool) -> list[str]:
    """Measure every candidate trial at every rung, skipping those the study already has (resumable).
    `plan_of(trial)` gives the plan string; failures are logged and left unmeasured. Returns the rung name of
    each measurement made (what the run counts as its work)."""
    done = rung_scores(study)
    todo = [(rung, t) for rung in rungs for t in candidates
            if done.get(rung.name, {}).get(t.number, {}).get("settings") != dataclasses.asdict(rung)]
    if not todo:
        return []
    from tqdm.auto import tqdm

    log.info("fidelity ladder: %d measurement(s) of %d front candidate(s) at %s", len(todo), len(candidates),
             ", ".join(r.name for r in rungs))
    for rung, trial in todo:
        runner.submit((rung, trial.number), "evaluate_at", f"{rung.name}{SEPARATOR}{plan_of(trial)}")
    measured = []
    for _ in tqdm(todo, desc="fidelity", unit="plan", disable=not progress):
        (rung, number), result = runner.next_result()
        if "error" in result:
            log.warning("fidelity %s of trial %d failed: %s", rung.name, number, result["error"])
            continue
        record_rung(study, rung, number, result)
        measured.append(rung.name)
    return measured


# --- reading the ladder (in the report) -------------------------------------------------------------------------


def bootstrap_interval(values: list[float], level: float = LEVEL, samples: int = 2000, seed: int = 0,
                       statistic=statistics.fmean):
    """(lo, hi): a percentile bootstrap interval of `statistic` (the mean; the median for timing rounds) of
    `values` (per-block values). One block gives no spread to resample: the interval is the value itself,
    which the report marks n=1 ("one block", not "certain")."""
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(seed)  # fixed: the same report twice gives the same numbers
    draws = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(samples))
    tail = (1 - level) / 2
    return draws[int(tail * (samples - 1))], draws[int(math.ceil((1 - tail) * (samples - 1)))]


def binomial_interval(hits: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """(lo, hi): the Clopper-Pearson interval of a success rate from `hits` of `n` (exact, never narrower than
    its level promises; a rate of 0 or 1 keeps one open side)."""
    from scipy.stats import beta

    if n < 1:
        raise ValueError("binomial_interval needs at least one trial")
    tail = (1 - level) / 2
    lo = 0.0 if hits == 0 else float(beta.ppf(tail, hits, n - hits + 1))
    hi = 1.0 if hits == n else float(beta.ppf(1 - tail, hits + 1, n - hits))
    return lo, hi


def dominated_at(points: dict[str, dict[int, tuple[float, float]]], order: list[str]) -> dict[int, str]:
    """{trial: the highest fidelity at which another trial measured there dominates it}. `points`:
    {fidelity: {trial: (quality to minimise, latency)}}; `order`: fidelities lowest first."""
    marked: dict[int, str] = {}
    for fidelity in order:
        measured = points.get(fidelity, {})
        for number, (q, lat) in measured.items():
            if any(oq <= q and ol <= lat and (oq, ol) != (q, lat) for n, (oq, ol) in measured.items() if n != number):
                marked[number] = fidelity  # later (higher) fidelities overwrite lower ones
    return marked


def retained(metrics: dict) -> float | None:
    """The share of the original's quality a plan keeps: its top-1 agreement with the original (the fraction
    of next tokens it predicts the same), or exp(-KL) when agreement was not measured; None when neither."""
    if "top1_agreement" in metrics:
        return metrics["top1_agreement"]
    if "kl" in metrics:
        return math.exp(-metrics["kl"])
    return None
