"""The fidelity ladder: front candidates re-measured at higher rungs than the search's proxy.

The proxy sees a few short blocks; a `linear` layer's error grows past its window, so the proxy can put on the
front a plan that a longer context shows is dominated (issue 13). A rung re-measures the same metrics against
the original model on its own held-out blocks (`RungSettings`: `factor` x the workload's prefill tokens per
block, from `source`, mixed over its sub-sources; optionally retrieval needle rows of that length), one block
at a time so the report can give an interval over blocks. Results live in the study's user attrs (Optuna refuses to change finished trials), so a resumed
run measures only what is missing. The report draws one front per fidelity and never mixes them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random

log = logging.getLogger(__name__)

# + "<rung>:trial:<n>" -> {"metrics": {name: mean}, "per_block": {name: [...]}, "settings": the rung's settings}
RUNG_STUDY_ATTR = "fidelity:"
SEPARATOR = "|"  # the runner passes one string: "<rung name>|<plan>"


# --- measuring (inside an evaluator) ----------------------------------------------------------------------------


def rung_inputs(tokenizer, rung, seq_len: int, data):
    """(blocks, needles) of `rung`: `rung.blocks` held-out token blocks of `seq_len` tokens, and `rung.needles`
    retrieval rows of the same length (None when 0), all from the held-out split of the rung's source (the
    same document split as the search's `data` settings, so no training or calibration text is scored)."""
    from layerboost_core.data import make_splits
    from layerboost_core.errors import UserError
    from layerboost_core.needles import make_needles

    source = rung.source or data.source
    # One block of the other splits: they are not used, and tokenizing the whole train split costs seconds.
    splits = make_splits(tokenizer, source, seq_len=seq_len, fractions=data.fractions,
                         blocks={"calibration": 1, "train": 1, "heldout": rung.blocks}, text_field=data.text_field,
                         heldout_seq_len=seq_len, mix_sources=True)
    if splits.heldout.shape[0] < rung.blocks:
        raise UserError(f"fidelity.rungs: rung {rung.name!r} asks for {rung.blocks} block(s) of {seq_len} tokens; "
                        f"the held-out text of {source!r} gives {splits.heldout.shape[0]}")
    needles = (make_needles(tokenizer, splits.documents["heldout"], context=seq_len, n_examples=rung.needles)
               if rung.needles else None)
    return splits.heldout, needles


def _needle_row(needles, i: int):
    """Needle row `i` alone, as a NeedleSet."""
    return dataclasses.replace(needles, **{f: getattr(needles, f)[i:i + 1] for f in
                                           ("input_ids", "answer_len", "needle_start", "needle_len", "keys", "answers")})


class BlockwiseProxy:
    """Proxy metrics per held-out block and per needle row: one ProxyEvaluator each (each caches its block's
    original distribution), so per-block values come back beside the mean. Build it while the model is
    all-softmax."""

    def __init__(self, model, blocks, needles=None):
        from layerboost_core.metrics import PROXY_METRICS, ProxyEvaluator

        self.evaluators = [(ProxyEvaluator(model, blocks[i:i + 1], batch_size=1), None) for i in range(blocks.shape[0])]
        if needles is not None:  # needle-only evaluators: no blocks, so only the retrieval metrics are asked
            retrieval = [n for n in PROXY_METRICS.names() if PROXY_METRICS.get(n).over == "needles"]
            self.evaluators += [(ProxyEvaluator(model, blocks[:0], batch_size=1, needles=_needle_row(needles, i)),
                                 retrieval) for i in range(needles.input_ids.shape[0])]

    def evaluate(self) -> dict:
        """{"metrics": {name: mean over blocks (rows)}, "per_block": {name: [value per block (row)]}} of the
        current plan. Blocks are equally long, so the mean over blocks is the mean over tokens."""
        per_block: dict[str, list[float]] = {}
        for evaluator, metrics in self.evaluators:
            for name, value in evaluator.evaluate(metrics).items():
                per_block.setdefault(name, []).append(value)
        return {"metrics": {name: sum(v) / len(v) for name, v in per_block.items()}, "per_block": per_block}


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


def ladder_candidates(front: list, k: int, bars, targets, softmax_latency: float | None) -> list:
    """Up to `k` trials of the latency-sorted proxy `front` worth re-measuring: the plans the best-plan files can
    name. In order: all-softmax (the reference every "kept" share and retrieval is read against), for each
    quality bar the fastest plan keeping it at the proxy (see `retained`), for each latency target (a share of
    all-softmax latency) the plan keeping the most under it, then plans spread over the front. Spreading alone
    spent most re-measurements on plans far past any bar a user accepts."""
    picks: list = []

    def add(trial) -> None:
        if trial is not None and trial not in picks and len(picks) < k:
            picks.append(trial)

    kept = {t.number: retained(proxy_metrics(t)) or 0.0 for t in front}
    add(next((t for t in front if set(t.user_attrs.get("plan", "")) == {"S"}), None))
    for bar in bars:
        add(next((t for t in front if kept[t.number] >= bar), None))  # front is sorted fastest first
    if softmax_latency:
        for target in targets:
            under = [t for t in front if t.values[1] <= target * softmax_latency]
            add(max(under, key=lambda t: kept[t.number]) if under else None)
    for trial in [*spread(front, k), *front]:
        add(trial)
    return picks


def record_rung(study, rung, number: int, result: dict) -> None:
    """Keep `result` of trial `number` at `rung` (its settings too: a rung re-declared under the same name with
    other settings is measured again, not mixed with the old numbers)."""
    study.set_user_attr(f"{RUNG_STUDY_ATTR}{rung.name}:trial:{number}",
                        {"metrics": {k: float(v) for k, v in result["metrics"].items()},
                         "per_block": {k: [float(x) for x in v] for k, v in result["per_block"].items()},
                         "settings": dataclasses.asdict(rung)})


def rung_scores(study) -> dict[str, dict[int, dict]]:
    """{rung: {trial number: {"metrics": ..., "per_block": ...}}} of every re-measured trial."""
    scores: dict[str, dict[int, dict]] = {}
    for key, value in study.user_attrs.items():
        if key.startswith(RUNG_STUDY_ATTR) and ":trial:" in key:
            rung, _, number = key.removeprefix(RUNG_STUDY_ATTR).rpartition(":trial:")
            scores.setdefault(rung, {})[int(number)] = value
    return scores


def climb(study, runner, candidates: list, rungs, plan_of, progress: bool) -> None:
    """Measure every candidate trial at every rung, skipping those the study already has (resumable).
    `plan_of(trial)` gives the plan string; failures are logged and left unmeasured."""
    done = rung_scores(study)
    todo = [(rung, t) for rung in rungs for t in candidates
            if done.get(rung.name, {}).get(t.number, {}).get("settings") != dataclasses.asdict(rung)]
    if not todo:
        return
    from tqdm.auto import tqdm

    log.info("fidelity ladder: %d measurement(s) of %d front candidate(s) at %s", len(todo), len(candidates),
             ", ".join(r.name for r in rungs))
    for rung, trial in todo:
        runner.submit((rung, trial.number), "evaluate_at", f"{rung.name}{SEPARATOR}{plan_of(trial)}")
    for _ in tqdm(todo, desc="fidelity", unit="plan", disable=not progress):
        (rung, number), result = runner.next_result()
        if "error" in result:
            log.warning("fidelity %s of trial %d failed: %s", rung.name, number, result["error"])
            continue
        record_rung(study, rung, number, result)


# --- reading the ladder (in the report) -------------------------------------------------------------------------


def bootstrap_interval(values: list[float], level: float = 0.9, samples: int = 2000, seed: int = 0):
    """(lo, hi): a percentile bootstrap interval of the mean of `values` (per-block values). One block gives
    no spread to resample: the interval is the value itself, which says "one block", not "certain"."""
    if len(values) < 2:
        return values[0], values[0]
    rng = random.Random(seed)  # fixed: the same report twice gives the same numbers
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(samples))
    tail = (1 - level) / 2
    return means[int(tail * (samples - 1))], means[int(math.ceil((1 - tail) * (samples - 1)))]


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


def fastest_keeping(candidates: dict[int, tuple[dict, float]], bar: float) -> int | None:
    """The trial with the lowest latency whose `retained` quality is >= `bar`. `candidates`:
    {trial: (metrics, latency)}. None when no candidate meets the bar."""
    meeting = [(lat, n) for n, (metrics, lat) in candidates.items() if (retained(metrics) or 0.0) >= bar]
    return min(meeting)[1] if meeting else None
