"""Which plans a search offers as best, on what evidence: the answer a user ships.

Every best-plan file names a plan that keeps the floors at the confirmation rung (fidelity.pick_rung: blocks of
held-out text the search never scored), judged at the pessimistic end of 90% intervals:

* quality: top-1 agreement with the original (the share of next tokens it predicts the same), low end of a
  bootstrap interval over blocks, >= `fidelity.agreement_floor`;
* retrieval: the facts it finds (planted in the same blocks, answered by generation through the hybrid cache),
  low end of a Clopper-Pearson interval, >= `objective.retrieval_floor` x the original's rate on the same facts
  (or at least as many facts as the original found). No retrieval floor where the original itself finds fewer
  than `objective.retrieval_min_original` of them: the report says so instead;
* ceilings (`objective.ceilings`): its measured serving metrics (per-round ratios to all-softmax; cache bytes
  exactly) not shown beyond them, e.g. a time to first token not shown longer than the original's: a plan is
  over a ceiling when the whole 90% interval of its median is, or the median by more than
  `objective.ceiling_slack` (Evidence.over_ceiling).

Among the plans that keep the floors, in the terms of the searched speed metric (objectives.SPEEDS: throughput,
time to first token, time per output token or request latency, measured against all-softmax serving the same
workload): `keep-<pct>pct` is the fastest whose agreement keeps that share at the low end; `<speed target>`
(`throughput-2x`, `latency-80pct`, ...) the lowest-KL one (high end of its interval) whose measured speed, at the
pessimistic end of its interval, reaches the target; `knee` the knee of the proxy front, only if it was confirmed
and keeps the floors; `fastest` the fastest plan that keeps the floors, whichever bar it meets (the floors are
what the user accepts: a plan keeping them is offered even where it reaches no bar and no target). The original (all-softmax) is measured as the reference and never offered. A target no
plan meets is said, with the fastest plan that keeps the floors.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .fidelity import binomial_interval, bootstrap_interval, is_original

KEEP_BARS = (0.99, 0.95, 0.9)  # best/keep-<pct>pct.json


@dataclass(frozen=True)
class Interval:
    """A value with its 90% interval and the number of samples it rests on (blocks, facts or rounds)."""

    value: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of_blocks(cls, values: list[float]) -> "Interval":
        lo, hi = bootstrap_interval(values)
        return cls(sum(values) / len(values), lo, hi, len(values))

    @classmethod
    def of_facts(cls, hits: int, n: int) -> "Interval":
        lo, hi = binomial_interval(hits, n)
        return cls(hits / n, lo, hi, n)

    @classmethod
    def of_rounds(cls, ratios: list[float]) -> "Interval":
        """The median of per-round ratios to all-softmax with a bootstrap interval of that median: one slow round
        (a busy machine) moves it less than the mean or the slowest round would."""
        ratios = [r for r in ratios if r == r]  # NaN: a round without the metric
        lo, hi = bootstrap_interval(ratios, statistic=statistics.median)
        return cls(statistics.median(ratios), lo, hi, len(ratios))

    def text(self, digits: int = 3, unit: str = "") -> str:
        value = f"{self.value:.{digits}f}{unit}"
        if self.n < 2:
            return f"{value} (n=1)"
        return f"{value} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


@dataclass(frozen=True)
class Floors:
    """What every best file keeps (see the module docstring); `note` says why there is no retrieval floor;
    `ceilings`: metric -> the share of all-softmax's value it may reach (throughput: the multiple it must reach)."""

    agreement: float
    retrieval_share: float | None
    note: str = ""
    ceilings: dict = field(default_factory=dict)
    ceiling_slack: float = 0.0  # how far a measured median may pass a ceiling while its interval does not


def keeps_retrieval(found: Interval, original: Interval, share: float) -> bool:
    """The retrieval floor on facts: a plan keeps it when it finds as many facts as the original did, or when the
    low end of its Clopper-Pearson interval is at least `share` x the original's rate on the same facts."""
    return found.value * found.n >= original.value * original.n or found.lo >= share * original.value


def retrieval_floor(objective, original: dict | None) -> tuple[float | None, str]:
    """(the retrieval_acc a plan must keep, or None; why there is none). `original`: the original model's own
    metrics on the proxy's facts ({} or None when none are planted). A share of an original that cannot
    retrieve (below `objective.retrieval_min_original`, e.g. 0 facts found) would be a meaningless floor:
    none is applied and the note says why."""
    found = (original or {}).get("retrieval_acc")
    if found is None:
        return None, "No retrieval floor: no facts are planted in the held-out blocks (proxy.facts = 0)."
    if found < objective.retrieval_min_original:
        return None, (f"No retrieval floor: the original model itself finds only {found:.0%} of the facts planted at "
                      f"the workload's context, below objective.retrieval_min_original "
                      f"({objective.retrieval_min_original:.0%}); retrieval is reported, not required.")
    return objective.retrieval_floor * found, ""


def floors_of(fidelity, objective, original: dict | None) -> Floors:
    """The floors every best file keeps: `fidelity.agreement_floor` and `objective.retrieval_floor` (as a share
    of the original's retrieval, unless the original cannot retrieve: see `retrieval_floor`, or the pick rung
    plants no facts: then no retrieval is claimed, and the note says so)."""
    value, note = retrieval_floor(objective, original)
    rung = next((r for r in fidelity.rungs if r.name == fidelity.pick_rung), None)
    if value is not None and rung is not None and rung.facts == 0:
        value, note = None, (f"No retrieval floor: the confirmation rung `{rung.name}` plants no facts "
                             f"(fidelity.rungs[{rung.name}].facts = 0), so picks are not judged on retrieval.")
    ceilings = {k: float(v) for k, v in objective.ceilings.items() if v is not None}
    return Floors(fidelity.agreement_floor, None if value is None else objective.retrieval_floor, note, ceilings,
                  objective.ceiling_slack)


@dataclass
class Evidence:
    """What was measured of one candidate: quality and retrieval at `fidelity`; serving measured against
    all-softmax (ratios over rounds, in each metric's own terms) or predicted by the cost model."""

    number: int
    plan: str
    fidelity: str
    kl: Interval
    agreement: Interval
    retrieval: Interval | None = None  # rate of facts found
    original_retrieval: Interval | None = None  # the original's rate on the same facts
    speed: Interval | None = None  # measured share of all-softmax's cost in the searched metric, over rounds
    predicted: float | None = None  # the cost model's share
    serving: dict = field(default_factory=dict)  # metric -> Interval of measured ratios to all-softmax
    predicted_serving: dict = field(default_factory=dict)  # metric -> predicted ratio to all-softmax
    concurrency: tuple | None = None  # (this plan's, all-softmax's) sequences served at once
    kv_share: float | None = None  # cache bytes per sequence over all-softmax's (exact)
    others: dict = field(default_factory=dict)  # other rungs: {rung: {"kl": Interval, "retrieval": Interval}}

    def as_dict(self) -> dict:
        """JSON-ready: every interval as {value, lo, hi, n}."""
        def of(i: Interval | None):
            return None if i is None else {"value": i.value, "lo": i.lo, "hi": i.hi, "n": i.n}
        return {"trial": self.number, "plan": self.plan, "fidelity": self.fidelity, "kl": of(self.kl),
                "top1_agreement": of(self.agreement), "retrieval_acc": of(self.retrieval),
                "original_retrieval_acc": of(self.original_retrieval), "speed_share_measured": of(self.speed),
                "speed_share_predicted": self.predicted,
                "serving_measured": {m: of(i) for m, i in self.serving.items()},
                "serving_predicted": dict(self.predicted_serving),
                "concurrency": list(self.concurrency) if self.concurrency else None, "kv_share": self.kv_share,
                "other_rungs": {rung: {k: of(v) for k, v in metrics.items()} for rung, metrics in self.others.items()}}

    @property
    def speed_high(self) -> float:
        """The speed share a pick is judged on: the pessimistic end of the measured median's interval, else the
        prediction."""
        if self.speed is not None:
            return self.speed.hi
        return self.predicted if self.predicted is not None else math.inf

    def ceiling_value(self, metric: str) -> float | None:
        """This plan's `metric` over all-softmax's: measured (median over rounds), else predicted; cache bytes
        exactly."""
        if metric == "kv_bytes":
            return self.kv_share
        if metric in self.serving:
            return self.serving[metric].value
        return self.predicted_serving.get(metric)

    def over_ceiling(self, metric: str, limit: float, slack: float = 0.0) -> bool:
        """True when this plan is beyond `limit` (throughput's: below it). A measured median counts as over when
        its whole 90% interval is, or when it is beyond `limit` by more than `slack` (a share): a hybrid whose
        prefill costs what softmax's does (linear at a 512-token prompt) measures 0.9-1.1x of the original's TTFT
        from round to round, and a median 2% past 1.0 is that noise, not a slower plan; one 27% past it is not,
        whatever a busy machine did to the interval. Predictions and cache bytes are compared as they are."""
        value = self.ceiling_value(metric)
        if value is None:
            return False
        measured = self.serving.get(metric) if metric != "kv_bytes" else None
        if measured is None:
            return value < limit if metric == "throughput" else value > limit
        if metric == "throughput":
            return measured.hi < limit or measured.value < limit * (1 - slack)
        return measured.lo > limit or measured.value > limit * (1 + slack)

    def quality_shortfall(self, floors: Floors) -> str | None:
        """Why this plan is below the agreement or retrieval floor, or None when it keeps both."""
        if self.agreement.lo < floors.agreement:
            return f"top-1 agreement {self.agreement.text()} < {floors.agreement:g}"
        if floors.retrieval_share is not None:
            if self.retrieval is None or self.original_retrieval is None:
                return f"retrieval not measured at {self.fidelity}"
            found, original = self.retrieval, self.original_retrieval
            if not keeps_retrieval(found, original, floors.retrieval_share):
                return f"retrieval {found.text()} < {floors.retrieval_share:.0%} of the original's {original.value:.3f}"
        return None

    def ceilings_over(self, floors: Floors) -> list[str]:
        """The metrics of `objective.ceilings` this plan is beyond (see `over_ceiling`), in the settings' order."""
        return [m for m, limit in floors.ceilings.items() if self.over_ceiling(m, limit, floors.ceiling_slack)]

    def shortfall(self, floors: Floors) -> str | None:
        """Why this plan is below the floors or over a ceiling (the first it misses), or None when it keeps them."""
        if (reason := self.quality_shortfall(floors)) is not None:
            return reason
        over = self.ceilings_over(floors)
        if not over:
            return None
        metric = over[0]
        limit, value, measured = floors.ceilings[metric], self.ceiling_value(metric), self.serving.get(metric)
        shown = f"{value:.2f}x" + (f" [{measured.lo:.2f}, {measured.hi:.2f}]" if measured is not None
                                   and metric != "kv_bytes" else "")
        if metric == "throughput":
            return f"throughput {shown} < the floor of {limit:g}x the original's (objective.ceilings)"
        return f"{metric} {shown} > the ceiling of {limit:g}x the original's (objective.ceilings)"


@dataclass
class Picks:
    chosen: dict[str, Evidence]  # best file name -> its plan's evidence
    unmet: list[str]  # one line per target no plan meets under the floors
    below: dict[int, str]  # candidate -> why it is not offered
    fastest: Evidence | None  # the fastest candidate that keeps the floors
    # candidate -> the ceilings it is over, for those that keep the agreement and retrieval floors
    held_by_ceilings: dict[int, list[str]] = field(default_factory=dict)


def pick(evidence: list[Evidence], floors: Floors, speed, knee: int | None = None, bars=KEEP_BARS) -> Picks:
    """The best files from the candidates' evidence (see the module docstring); `speed`: the searched metric
    (objectives.Speed), whose targets name the speed files."""
    below = {e.number: reason for e in evidence if (reason := e.shortfall(floors)) is not None}
    # The original itself (all-softmax, measured as the reference) keeps every floor and is never offered: a
    # best file names a plan that saves something.
    keeping = sorted((e for e in evidence if e.number not in below and not is_original(e.plan)),
                     key=lambda e: (e.speed_high, e.kl.hi))
    fastest = keeping[0] if keeping else None
    chosen: dict[str, Evidence] = {}
    unmet: list[str] = []
    fastest_line = (f"the fastest plan that keeps the floors is `{fastest.plan}` at {_share(fastest, speed)}"
                    if fastest else "no plan but the original keeps the floors")
    for bar in bars:
        name = f"keep-{round(bar * 100)}pct"
        meeting = [e for e in keeping if e.agreement.lo >= bar]
        if meeting:
            chosen[name] = meeting[0]
        else:
            unmet.append(f"`{name}`: no plan but the original keeps {bar:.0%} top-1 agreement at the low end of its "
                         f"interval with the floors kept; {fastest_line}")
    for target in speed.targets:
        name = speed.file_name(target)
        fitting = [e for e in keeping if e.speed_high <= speed.share(target)]
        if fitting:
            chosen[name] = min(fitting, key=lambda e: (e.kl.hi, e.speed_high))
        else:
            goal = (f"serves >= {target:g}x all-softmax's {speed.label}" if speed.direction == "maximize"
                    else f"runs at <= {target:.0%} of all-softmax's {speed.label}")
            unmet.append(f"`{name}`: no plan that keeps the floors {goal}; {fastest_line}")
    knee_evidence = next((e for e in keeping if e.number == knee), None)
    if knee_evidence is not None:
        chosen["knee"] = knee_evidence
    if fastest is not None:
        chosen["fastest"] = fastest
    held = {e.number: over for e in evidence
            if e.quality_shortfall(floors) is None and (over := e.ceilings_over(floors))}
    return Picks(chosen, unmet, below, fastest, held)


def answer_json(picks: Picks, floors: Floors, speed) -> dict:
    """The answer as data (answer.json): the floors, every plan offered and why each unmet target is unmet,
    the fastest plan that keeps the floors (offered or not) and the candidates below the floors."""
    return {"schema": "layerboost.answer/v2", "speed": {"metric": speed.key, "label": speed.label},
            "floors": {"top1_agreement": floors.agreement, "retrieval_share_of_original": floors.retrieval_share,
                       "ceilings": dict(floors.ceilings)},
            "best": {name: e.as_dict() for name, e in picks.chosen.items()},
            "unmet": list(picks.unmet),
            "fastest_keeping_floors": picks.fastest.as_dict() if picks.fastest else None,
            "below_floors": {str(n): reason for n, reason in sorted(picks.below.items())}}


def _share(e: Evidence, speed) -> str:
    if e.speed is not None:
        return f"{_measured(e.speed, speed)} of all-softmax's measured {speed.label}"
    if e.predicted is not None:
        return f"{speed.text(e.predicted)} of all-softmax's predicted {speed.label}"
    return "an unmeasured speed"


def _measured(share: Interval, speed) -> str:
    """A measured cost share in the metric's own terms: `2.31x [2.10, 2.52]` of throughput (the interval of a
    multiple runs the other way), `0.82x [0.79, 0.85]` of a time."""
    if speed.direction == "maximize":
        return f"{1 / share.value:.2f}x [{1 / share.hi:.2f}, {1 / share.lo:.2f}]"
    return f"{share.value:.3f}x [{share.lo:.3f}, {share.hi:.3f}]"


def _ratio_cell(e: Evidence, metric: str) -> str:
    if metric in e.serving:
        i = e.serving[metric]
        return f"{i.value:.2f}x [{i.lo:.2f}, {i.hi:.2f}]"
    if e.predicted_serving.get(metric) is not None:
        return f"{e.predicted_serving[metric]:.2f}x (predicted)"
    return ""


def answer_table(picks: Picks, floors: Floors, speed, export_command) -> str:
    """The answer first: per plan offered (with the best files that name it), its serving measured against
    all-softmax (the searched metric first, with its interval and the cost model's prediction; then the other
    serving metrics, the sequences served at once and the cache per sequence), quality and retrieval with their
    intervals, at which fidelity, and the command that exports it. `export_command(name)` gives the command for
    best file `name`."""
    others = [m for m in ("throughput", "ttft", "tpot") if m != speed.key]
    lines = [f"| best files | plan | {speed.label} vs all-softmax: measured median [90%] | predicted | "
             + " | ".join(f"{m} vs all-softmax" for m in others)
             + " | sequences at once (all-softmax) | cache per sequence | KL [90%] | top-1 agreement [90%] | "
               "retrieval: facts found [90%] | fidelity | other rungs | export |",
             "|---" * (12 + len(others)) + "|"]
    by_trial: dict[int, list[str]] = {}
    for name, e in picks.chosen.items():
        by_trial.setdefault(e.number, []).append(name)
    for number, names in by_trial.items():
        e = picks.chosen[names[0]]
        measured = (f"{_measured(e.speed, speed)}, {e.speed.n} rounds" if e.speed is not None else "not measured")
        predicted = speed.text(e.predicted) if e.predicted is not None else ""
        retrieval = (f"{round(e.retrieval.value * e.retrieval.n)}/{e.retrieval.n} {e.retrieval.text()}"
                     if e.retrieval is not None else "not measured")
        rungs = "; ".join(f"{rung}: KL {m['kl'].text()}" + (f", retrieval {m['retrieval'].text()}"
                                                             if m.get("retrieval") else "")
                          for rung, m in e.others.items())
        files = ", ".join(f"`{name}.json`" for name in names)
        at_once = f"{e.concurrency[0]} ({e.concurrency[1]})" if e.concurrency else ""
        kv = f"{e.kv_share:.2f}x" if e.kv_share is not None else ""
        lines.append(f"| {files} | `{e.plan}` | {measured} | {predicted} | "
                     + " | ".join(_ratio_cell(e, m) for m in others)
                     + f" | {at_once} | {kv} | {e.kl.text(4)} | {e.agreement.text()} | {retrieval} | {e.fidelity} | "
                       f"{rungs} | `{export_command(names[0])}` |")
    if not picks.chosen:
        lines.append("| (none) | no plan but the original keeps the floors |" + " |" * (10 + len(others)))
    lines += [""] + [f"- {line}" for line in picks.unmet]
    return "\n".join(lines)


def floors_line(floors: Floors, fidelity: str, original: Interval | None) -> str:
    """One sentence stating the floors every best file keeps."""
    parts = [f"top-1 agreement with the original >= {floors.agreement:g}"]
    if floors.retrieval_share is not None:
        found = (f" (the original found {round(original.value * original.n)}/{original.n})"
                 if original is not None else "")
        parts.append(f">= {floors.retrieval_share:.0%} of the original's retrieval{found}")
    limits = [f"{metric} {'>=' if metric == 'throughput' else '<='} {limit:g}x the original's"
              for metric, limit in floors.ceilings.items()]
    text = (f"Every best file keeps, at fidelity `{fidelity}` and the pessimistic end of its 90% intervals: "
            + " and ".join(parts) + "."
            + (f" Its measured serving is not shown beyond the ceilings (over one when the whole 90% interval of "
               f"its median is, or the median by more than {floors.ceiling_slack:.0%}): {' and '.join(limits)}."
               if limits else ""))
    return text + (f" {floors.note}" if floors.note else "")
